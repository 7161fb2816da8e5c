# The two commands of the README:
#   make demo   installs fastaccum and runs `fastaccum bench` on its default workload (a
#               byte-level GPT trained on the Python standard library's sources, native
#               PyTorch against fastaccum; table, bench.json and bench.png in fastaccum-bench/)
#   make test   installs fastaccum with its test tools and runs lint (ruff, mypy) + the whole
#               test suite
#
# Install rules: keep the torch that is already installed; with none, take torch==2.13.0
# (the CPU build on a machine without a GPU). Build with --no-build-isolation, since an
# isolated build environment would download a different torch.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install demo test lint bench-cpu bench-gpu check-cuda-torch clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install setuptools wheel ninja pybind11
	$(PIP) install --no-build-isolation -e ".[test,triton,bench,examples]"

demo: install
	fastaccum bench

lint:
	ruff check .
	ruff format --check .
	$(PYTHON) -m mypy

test: install lint
	$(PYTHON) -m pytest tests
	$(PYTHON) -m pytest benchmarks --benchmark-disable -q

bench-cpu: install
	$(PYTHON) -m pytest benchmarks/test_accumulate_cpu.py benchmarks/test_wrapper_cpu.py \
		benchmarks/test_wgrad_cpu.py benchmarks/test_batchnorm_cpu.py

# On an offline GPU machine that already has torch, Triton and the test tools, install with
# `pip install --no-build-isolation --no-deps -e .` and run `make bench-gpu NO_INSTALL=1`.
bench-gpu: $(if $(NO_INSTALL),,install)
	$(PYTHON) benchmarks/gpu_accumulate.py
	$(PYTHON) benchmarks/gpu_wrapper.py
	$(PYTHON) benchmarks/gpu_wrapper.py --micro-batch 1 --seq 128
	$(PYTHON) benchmarks/gpu_wgrad.py
	$(PYTHON) benchmarks/gpu_batchnorm.py
	$(PYTHON) benchmarks/gpu_activation_memory.py
	$(PYTHON) benchmarks/gpu_plan.py

# Without a GPU: build against PyPI's CUDA torch (default 2.11.0, the GPU machines'; several
# GB, in /tmp/fastaccum-cuda-torch) and run the test suite with that torch and its Triton.
check-cuda-torch:
	bash tools/check_cuda_torch.sh

clean:
	rm -rf build *.egg-info fastaccum/*.so .pytest_cache .benchmarks
