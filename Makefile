# make test  : install (venv, torch, triton, ...), build the extension, run the tests
# make bench : install, build, parity summary, kernel and encoder benchmarks (quick plan), REPORT.md -> bench/results/
#              (python -m attnfast bench all --quick; --list shows every suite)
# make test-asan : the C++ extension built with ASan + UBSan into build/asan/ (the in-place build
#                  stays as it is), then the CPU parity, error, op and fuzz tests under it
# make fuzz  : the fuzz tests with their large profile
# make sweep : the parity checks of the CPU, nn, variant and Triton suites over SWEEP_RUNS runs
#              of fresh seeds: how often each fails, the checks nearest their bound (tools/parity_sweep.py)
# make harness : build/attnfast_harness, the CUDA kernels' standalone test and timing binary (nvcc only, no torch)
# make test-compat : the versions of the GPU machine (Python 3.12, torch 2.11, triton 3.6, numpy < 2.4) on
#                    CPU, in their own .venv-compat: the Triton kernels under the interpreter (tests/triton and
#                    the Triton cases of the API and variant tests) and their sm90 compile check
# PYTHON=python3 uses an existing interpreter as it is (nothing is installed
# into it but attnfast itself); by default a .venv is created here.
VENV      := .venv
PYTHON    ?=
TORCH_PIN := torch==2.13.0
DEPS      := triton pytest numpy hypothesis tqdm matplotlib ninja expecttest transformers

ifeq ($(PYTHON),)
PY    := $(VENV)/bin/python
READY := $(VENV)/.deps-installed
else
PY    := $(PYTHON)
READY :=
endif

.PHONY: test-torch-sdpa all deps build test test-fast test-asan test-compat fuzz sweep bench info clean harness

all: test

$(VENV)/.deps-installed:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install $(DEPS)
	touch $@

deps: $(READY)

# Editable install of the Python package once (it maps attnfast.triton_kernels
# to triton_kernels/ and attnfast.bench to bench/, and registers the pytest plugin;
# an install from before a mapping or the plugin existed is redone), then an
# incremental in-place build of attnfast._C.
build: deps
	@$(PY) -c "import attnfast.triton_kernels, attnfast.bench, importlib.metadata as m; \
		assert [e.value for e in m.entry_points(group='pytest11') if e.name == 'attnfast'] == ['attnfast_pytest']" \
		2>/dev/null || \
		ATTNFAST_SKIP_EXT=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

# Needs only the deps: it builds its own (sanitized) extension and imports no other.
test-asan: deps
	tools/asan_test.sh $(PY)

FUZZ := ATTNFAST_FUZZ_PROFILE=fuzz $(PY) -m pytest -q tests/api/test_fuzz.py

fuzz: build
	$(FUZZ)

SWEEP_RUNS ?= 10
sweep: build
	$(PY) tools/parity_sweep.py --runs $(SWEEP_RUNS) tests/cpu tests/nn tests/variants tests/triton

bench: build
	$(PY) -m attnfast bench all --quick

info: build
	$(PY) -m attnfast info

# The GPU machine's versions.  PyPI's torch 2.11 for Linux x86-64 is the CUDA build (~2.5 GB with
# its CUDA libraries; it runs on CPU); no CPU build of it is on PyPI.  triton 3.6's interpreter
# fails on numpy >= 2.4.  attnfast._C is not built: the Triton backend runs without it.
# COMPAT_PYTHON: a Python 3.12 (where it is a pyenv shim, it runs with PYENV_VERSION=3.12).
COMPAT_VENV   := .venv-compat
COMPAT_PYTHON ?= python3.12
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_DEPS   := torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest expecttest
COMPAT_TESTS  := tests/triton tests/api/test_api.py tests/api/test_dropout.py tests/api/test_errors.py \
                 tests/api/test_kvcache.py tests/api/test_reliability.py tests/api/test_varlen.py \
                 tests/variants/test_variants.py

$(COMPAT_VENV)/.deps-installed:
	@py="$(COMPAT_PYTHON)"; $$py -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || \
	{ py="env PYENV_VERSION=3.12 $(COMPAT_PYTHON)"; $$py -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; } || \
	{ echo "no Python 3.12 found ('$(COMPAT_PYTHON)'); install one or pass COMPAT_PYTHON=/path/to/python3.12" >&2; exit 1; }; \
	echo "$$py -m venv $(COMPAT_VENV)"; $$py -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --upgrade pip setuptools wheel
	$(COMPAT_PY) -m pip install $(COMPAT_DEPS)
	ATTNFAST_SKIP_EXT=1 $(COMPAT_PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

test-compat: $(COMPAT_VENV)/.deps-installed
	$(COMPAT_PY) -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	env -u TRITON_INTERPRET $(COMPAT_PY) -m attnfast.triton_kernels.compile_check --archs 90 --heads 64 --masks bool --first
	TRITON_INTERPRET=1 $(COMPAT_PY) -m pytest -q $(COMPAT_TESTS) -k triton

# PyTorch's own SDPA tests with attnfast patched in (CPU tests), against the list of expected
# differences in tests/conformance/: TORCH_TESTS=path/to/test/test_transformers.py of the torch
# release in use (PyTorch's source, outside this repository); without it, the file of the
# installed torch's release tag is fetched from GitHub into build/ (where GitHub is reachable).
TORCH_RELEASE = $$($(PY) -c "import torch; print(torch.__version__.split('+')[0])")
TORCH_TAG_URL = https://raw.githubusercontent.com/pytorch/pytorch/v$(TORCH_RELEASE)/test
test-torch-sdpa: build
	@mkdir -p build
	@if [ -z "$(TORCH_TESTS)" ]; then \
		curl -sSf --max-time 60 -o build/test_transformers.py $(TORCH_TAG_URL)/test_transformers.py && \
		curl -sSf --max-time 60 -o build/test_cpp_extensions_open_device_registration.py \
			$(TORCH_TAG_URL)/test_cpp_extensions_open_device_registration.py || \
		{ echo "PyTorch's test file is unreachable here: set TORCH_TESTS=path/to/test_transformers.py"; exit 2; }; fi
	$(PY) tools/torch_sdpa_conformance.py $(or $(TORCH_TESTS),build/test_transformers.py) \
		--junit build/torch_sdpa_conformance.xml

# Needs only nvcc; runs on sm_80+ (`build/attnfast_harness --help` lists the modes).
NVCC         ?= nvcc
HARNESS_ARCH := -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
HARNESS_SRC  := csrc/cuda/tools/harness.cu csrc/cuda/flash_fwd.cu csrc/cuda/flash_bwd.cu

harness: build/attnfast_harness

build/attnfast_harness: $(HARNESS_SRC) $(wildcard csrc/cuda/*.h csrc/cuda/*.cuh)
	mkdir -p build
	$(NVCC) -O3 -std=c++17 $(HARNESS_ARCH) -Icsrc/cuda $(HARNESS_SRC) -o $@

clean:
	rm -rf build *.egg-info attnfast/*.so
