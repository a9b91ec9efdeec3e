# One command sets up and runs each job on a fresh machine:
#   make demo   - virtual environment + torch + build, then the main job
#   make test   - the same set-up, then ruff, the whole test suite and the CPU-only build check
#   make demo CPU_ONLY=1 - the demo without CUDA: CPU-only torch, runtime dependencies, CPU kernels
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# CPU-only torch for the build check and CPU_ONLY (a local wheel here; elsewhere PyTorch's CPU index).
TORCH_CPU_SPEC ?= torch==2.13.0+cpu
CPU_VENV ?= .venv-cpu
ifdef CPU_ONLY
# No CUDA wheels (about 3 GB less to download, 5 GB less on disk) and no CUDA build: a venv of its own.
VENV ?= .venv-cpuonly
TORCH_SPEC ?= $(TORCH_CPU_SPEC)
# Where PyPI's indexes have no CPU-only torch (PyPI itself has none for Linux), PyTorch's CPU index.
TORCH_FALLBACK = || $(PY) -m pip install -q --disable-pip-version-check \
    --index-url https://download.pytorch.org/whl/cpu torch==2.14.1
REQUIREMENTS ?= requirements-run.txt
# its own build folder: CMake's cache there knows the other torch
BUILD_ARGS ?= -Cbuild-dir=build/cpu-only-demo
export PYSSL_CUDA ?= OFF
export PYSSL_CUDA_EMULATE ?= OFF
else
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
REQUIREMENTS ?= requirements-dev.txt
BUILD_ARGS ?=
# Also build pyssl._C_emu: the CUDA kernels' sources on the CPU emulator, so the CUDA tests run
# here without a GPU (tests/test_*: backend "emu").
export PYSSL_CUDA_EMULATE ?= ON
endif
PY := $(VENV)/bin/python
# CUDA architectures the kernels are compiled for (CMake syntax: 90, "80;90", native).
export PYSSL_CUDA_ARCH ?= 90
PYTEST_ARGS ?=
# Arguments of `make demo` (python -m pyssl.demo), e.g. DEMO_ARGS=--finetune.
DEMO_ARGS ?=

.PHONY: setup build lint test pytest sass-check check-cpu-build demo bench clean

$(VENV)/.deps-stamp: $(REQUIREMENTS) requirements-run.txt
	@echo "== set-up: $(VENV) with $(TORCH_SPEC) and $(REQUIREMENTS) (once; the CUDA torch is a ~3 GB download, ~6 GB installed)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC) $(TORCH_FALLBACK)
	$(PY) -m pip install -q --disable-pip-version-check -r $(REQUIREMENTS)
	touch $@

setup: $(VENV)/.deps-stamp

# The compiler's progress ([k/n] lines) is shown; pip's full output goes to build/pip-install.log.
build: setup
	@echo "== building the extension ($(if $(filter OFF,$(PYSSL_CUDA)),CPU kernels,CPU and CUDA kernels: about 3 minutes on 2 cores the first time)); log in build/pip-install.log"
	@mkdir -p build
	@SECONDS=0; $(PY) -m pip install -v --disable-pip-version-check --no-build-isolation --no-deps -e . $(BUILD_ARGS) 2>&1 \
	    | tee build/pip-install.log | { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] ' || true; } \
	    || { echo "== the build failed: the end of build/pip-install.log:"; tail -30 build/pip-install.log; exit 1; }; \
	    echo "== built in $${SECONDS} s"

# The CUDA tests run twice: on a GPU when there is one, and always on the CPU emulator (a build
# without it fails here instead of skipping them). --durations names the slowest tests.
pytest: build
	PYSSL_REQUIRE_EMULATION=1 $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

# Lint and format check (configured in pyproject.toml): needs ruff only, not the built extension.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint pytest sass-check check-cpu-build

# Registers, shared memory, spills and HMMA use of every compiled CUDA kernel, from its SASS
# (benchmarks/sass_report.py): fails when a hot kernel spills or a tensor-core kernel has no
# HMMA. The spill named here is known (a 4-byte value kept on the stack) and tracked until that
# kernel is rebuilt; a spill anywhere else fails.
KNOWN_SPILLS := --known-spill "pyssl::infonce::cuda::lse_partial_kernel<float>"
sass-check: build
	$(PY) benchmarks/sass_report.py --check $(KNOWN_SPILLS)

# The same sources must build and import against a CPU-only torch (no CUDA sources compiled).
# PyPI serves no CPU-only torch: TORCH_CPU_SPEC comes from a local wheel on this project's
# machines (pip's find-links) or from PyTorch's CPU index (PIP_EXTRA_INDEX_URL=
# https://download.pytorch.org/whl/cpu). Where it cannot be installed, the check says so and
# builds with PYSSL_CUDA=OFF against the torch of $(VENV) instead, which $(CPU_VENV) then sees
# through a .pth file (its own torch, if any, is removed so that one is used).
CPU_PIP := $(CPU_VENV)/bin/python -m pip install -q --disable-pip-version-check
check-cpu-build:
	test -x $(CPU_VENV)/bin/python || $(PYTHON) -m venv $(CPU_VENV)
	@site=$$($(CPU_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))"); \
	rm -f "$$site/pyssl-borrowed-torch.pth"; \
	if $(CPU_PIP) $(TORCH_CPU_SPEC); then \
	    cuda=AUTO; torch_kind=cpu-only; build_dir=build/cpu-only; \
	else \
	    echo "check-cpu-build: $(TORCH_CPU_SPEC) cannot be installed (PyPI has no CPU-only torch; set" \
	         "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for it): building with PYSSL_CUDA=OFF" \
	         "against the torch of $(VENV) instead"; \
	    test -x $(PY) || { echo "check-cpu-build: $(PY) is missing: run make setup first"; exit 1; }; \
	    $(CPU_VENV)/bin/python -m pip uninstall -q -y torch >/dev/null 2>&1; \
	    $(PY) -c "import sysconfig; print(sysconfig.get_path('purelib'))" >"$$site/pyssl-borrowed-torch.pth"; \
	    cuda=OFF; torch_kind=borrowed; build_dir=build/cpu-only-borrowed; \
	fi; \
	set -e; \
	$(CPU_PIP) numpy "scikit-build-core>=0.10" cmake==4.4.5 ninja==1.13.2; \
	PYSSL_CUDA=$$cuda $(CPU_PIP) --no-build-isolation --no-deps . -Cbuild-dir=$$build_dir; \
	cd /tmp && PYSSL_SMOKE_TORCH=$$torch_kind $(abspath $(CPU_VENV))/bin/python $(abspath tests/cpu_build_smoke.py)

demo: build
	@echo "== the demo: SimCLR on the embedded digits, 40 epochs on the CPU (about a minute), then the evaluation"
	$(PY) -m pyssl.demo $(DEMO_ARGS)

bench: build
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf build dist $(CPU_VENV)
