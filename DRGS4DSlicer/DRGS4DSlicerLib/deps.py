"""First-use installation of the engine's Python dependencies into Slicer's Python.

Nothing is installed without asking: the panel injects an ``ask(title, text) -> bool`` function (a Qt dialog in
Slicer, a stub in tests).  PyTorch comes through the PyTorch extension's PyTorch Utils (the extension depends on it:
``EXTENSION_DEPENDS PyTorch``), which picks the wheel that matches the GPU driver; plain pip is only a fallback for a
source checkout without that extension.  The other packages go through ``slicer.packaging.pip_ensure``, which first
ships with Slicer 5.12, else ``slicer.util.pip_install`` (Slicer 5.10).  An external Python environment is never
modified: the panel only probes it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import re

from .protocol import tr

log = logging.getLogger("DRGS4D.deps")

# The engine's runtime requirements (setup.py install_requires) apart from torch, which is handled separately.
REQUIREMENTS = [
    "numpy>=1.24",
    "scipy>=1.10",
    "SimpleITK>=2.2",
    "nibabel>=5.0",
    "pynrrd>=1.0",
    "scikit-image>=0.21",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "pydicom>=3.0",  # the panel's DICOM mode (the worker's --list-dicom and DICOM requests)
]
TORCH_REQUIREMENT = "torch>=2.1"
# Distribution name -> import name, for packages that Slicer bundles without pip metadata (e.g. SimpleITK).
IMPORT_NAMES = {"scikit-image": "skimage", "pynrrd": "nrrd", "SimpleITK": "SimpleITK"}
REQUESTER = "DRGS4D"


class DependencyError(RuntimeError):
    """Installation was declined or failed; the message is for the user."""


def _split(requirement: str) -> tuple[str, str]:
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    return (match.group(1), match.group(2).strip()) if match else (requirement, "")


def _version_tuple(text: str) -> tuple:
    parts = []
    for piece in re.split(r"[.+\-]", text):
        if piece.isdigit():
            parts.append(int(piece))
        else:
            digits = re.match(r"\d+", piece)
            if digits:
                parts.append(int(digits.group()))
            break
    return tuple(parts)


def is_satisfied(requirement: str) -> bool:
    """Is ``requirement`` (name plus optional ``>=`` / ``==`` bound) installed in this interpreter?"""
    name, spec = _split(requirement)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        # bundled with Slicer without pip metadata: importable is good enough (never pip-install over it)
        return importlib.util.find_spec(IMPORT_NAMES.get(name, name.replace("-", "_"))) is not None
    if not spec:
        return True
    try:
        from packaging.requirements import Requirement

        return Requirement(requirement).specifier.contains(installed, prereleases=True)
    except ImportError:  # pragma: no cover - packaging is nearly always present
        pass
    if spec.startswith(">="):
        return _version_tuple(installed) >= _version_tuple(spec[2:])
    if spec.startswith("=="):
        return _version_tuple(installed) == _version_tuple(spec[2:])
    return True


def missing_requirements(requirements=None) -> list[str]:
    return [r for r in (REQUIREMENTS if requirements is None else requirements) if not is_satisfied(r)]


def torch_missing() -> bool:
    return not is_satisfied(TORCH_REQUIREMENT)


class Installer:
    """Installs dependencies after asking.  The Slicer modules are looked up lazily and can be injected for tests.

    packaging: ``slicer.packaging`` (or None when this Slicer lacks it); util: ``slicer.util``;
    pytorch_utils: the ``PyTorchUtils`` module of the PyTorch extension (or None).
    """

    _UNSET = object()

    def __init__(self, ask, packaging=_UNSET, util=_UNSET, pytorch_utils=_UNSET, status=None):
        self.ask = ask
        self.status = status or (lambda text: log.info("%s", text))
        self._packaging = packaging
        self._util = util
        self._pytorch_utils = pytorch_utils

    # -- lazily resolved Slicer pieces --
    @staticmethod
    def _try_import(name):
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    @property
    def packaging(self):
        if self._packaging is Installer._UNSET:
            module = self._try_import("slicer.packaging")
            self._packaging = module if module is not None and hasattr(module, "pip_ensure") else None
        return self._packaging

    @property
    def util(self):
        if self._util is Installer._UNSET:
            self._util = self._try_import("slicer.util")
        return self._util

    @property
    def pytorch_utils(self):
        if self._pytorch_utils is Installer._UNSET:
            self._pytorch_utils = self._try_import("PyTorchUtils")
        return self._pytorch_utils

    # -- the workflow --
    def plan(self, include_torch: bool = True, requirements=None) -> tuple[list[str], bool]:
        return missing_requirements(requirements), (include_torch and torch_missing())

    def ensure(self, include_torch: bool = True, requirements=None) -> bool:
        """Install what is missing after asking; True when everything is available afterwards.

        Raises DependencyError when the user declines or installation fails.
        """
        missing, need_torch = self.plan(include_torch, requirements)
        if not missing and not need_torch:
            return True
        items = list(missing)
        if need_torch:
            if self.pytorch_utils is not None:
                items.insert(0, tr("{requirement} (through the PyTorch Utils extension)",
                                   requirement=TORCH_REQUIREMENT))
            else:
                items.insert(0, tr("{requirement} (from the Python Package Index: install the PyTorch extension from "
                                   "the Extensions Manager first for a build that matches your GPU)",
                                   requirement=TORCH_REQUIREMENT))
        text = tr("DRGS4D needs these Python packages in Slicer's Python environment:\n\n  {packages}\n\nThey are "
                  "downloaded and installed now (this can take several minutes; PyTorch is large). Install them?",
                  packages="\n  ".join(items))
        if not self.ask(tr("DRGS4D: install Python packages"), text):
            raise DependencyError(tr("The required Python packages were not installed. Reconstruction needs them; "
                                     "alternatively choose an external Python environment that has drgs_core "
                                     "installed (Advanced settings)."))
        if need_torch:
            self.install_torch()
        if missing:
            self.pip_install(missing)
        importlib.invalidate_caches()
        still = self.plan(include_torch, requirements)
        if still[0] or still[1]:
            raise DependencyError(tr("Installation finished but these are still missing: {packages}. Restart Slicer "
                                     "and try again.",
                                     packages=", ".join(still[0] + ([TORCH_REQUIREMENT] if still[1] else []))))
        return True

    def install_torch(self) -> None:
        """PyTorch through PyTorch Utils (``PyTorchUtilsLogic.installTorch``, which lets light-the-torch pick the build
        for the GPU driver; Testing/slicer/slicer_standins.py states what the panel relies on), else with pip."""
        utils = self.pytorch_utils
        if utils is None:
            self.status(tr("Installing PyTorch with pip..."))
            self.pip_install([TORCH_REQUIREMENT])
            return
        self.status(tr("Installing PyTorch through the PyTorch Utils extension..."))
        logic = utils.PyTorchUtilsLogic()
        try:
            if logic.torchInstalled():  # installed, yet our check found it missing: older than the requirement
                raise DependencyError(tr(
                    "The installed PyTorch is older than DRGS4D needs ({requirement}). Open the PyTorch Utils module, "
                    "uninstall PyTorch, restart Slicer and install it again.", requirement=TORCH_REQUIREMENT))
            torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=_split(TORCH_REQUIREMENT)[1])
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - pip / light-the-torch failures, a broken torch import
            raise DependencyError(tr("PyTorch could not be installed through the PyTorch Utils extension: {reason}. "
                                     "Install it from the PyTorch Utils module, then try again.", reason=exc)) from exc
        if torch is None:  # only when PyTorch Utils asked and the user declined; kept as a safeguard
            raise DependencyError(tr("PyTorch was not installed. Install it from the PyTorch Utils module, then try "
                                     "again."))

    def pip_install(self, requirements: list[str]) -> None:
        self.status(tr("Installing {packages}...", packages=", ".join(requirements)))
        packaging = self.packaging
        try:
            if packaging is not None:
                try:
                    from packaging.requirements import Requirement

                    reqs = [Requirement(r) for r in requirements]
                except ImportError:  # pragma: no cover
                    reqs = list(requirements)
                packaging.pip_ensure(reqs, prompt_install=False, requester=REQUESTER)
            elif self.util is not None and hasattr(self.util, "pip_install"):
                self.util.pip_install(list(requirements))  # a list: each item is passed to pip as one argument
            else:  # pragma: no cover - outside Slicer
                raise DependencyError(tr("No installer available: run 'pip install {packages}'.",
                                         packages=" ".join(requirements)))
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise DependencyError(tr("Installing {packages} failed: {reason}", packages=", ".join(requirements),
                                     reason=exc)) from exc
