# Quick start: `make demo` (phantom -> FDK -> 4DRGS -> evaluation) and `make test`.
PYTHON ?= python3
# The CPU build of PyTorch that CI and these machines install; the package itself accepts torch>=2.1.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench-cpu clean

.install.stamp: setup.py
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[test]"
	touch .install.stamp

install: .install.stamp

demo: install
	drgs4d demo --out demo_out

test: install
	$(PYTHON) -m pytest -q

clean:
	rm -rf demo_out .install.stamp .pytest_cache
