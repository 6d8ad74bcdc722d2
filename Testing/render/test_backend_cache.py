"""The backend choice is resolved once per backend (kernels ask on every launch); $DRGS4D_BACKEND still counts
on every call."""

import pytest
import torch

from drgs_core import cuda
from drgs_core.errors import DRGSInputError


class _Fake:
    calls = 0

    @classmethod
    def available(cls):
        cls.calls += 1
        return True

    @staticmethod
    def unavailable_reason():
        return None


def test_availability_is_resolved_once_and_the_env_override_still_applies(monkeypatch):
    _Fake.calls = 0
    monkeypatch.setattr(cuda, "_modules", {"cuda-ext": _Fake, "triton": None})
    monkeypatch.setattr(cuda, "_usable", {})
    monkeypatch.delenv("DRGS4D_BACKEND", raising=False)
    dev = torch.device("cuda")
    assert [cuda.active_backend(dev) for _ in range(50)] == ["cuda-ext"] * 50
    assert _Fake.calls == 1
    assert not cuda.is_available("triton") and cuda.backend_module("triton") is None
    monkeypatch.setenv("DRGS4D_BACKEND", "torch")
    assert cuda.active_backend(dev) == "torch"
    monkeypatch.setenv("DRGS4D_BACKEND", "triton")
    with pytest.raises(DRGSInputError, match="forced backend"):
        cuda.active_backend("cuda:0")
    monkeypatch.setenv("DRGS4D_BACKEND", "auto")
    assert cuda.active_backend("cuda:0") == "cuda-ext" and _Fake.calls == 1
    assert cuda.active_backend("cpu") == "torch"
