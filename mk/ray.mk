# Ray Data for `pipeline teacher --ray`, installed into the project's .venv, and the tests that need it.
# Included from the main Makefile (`-include mk/*.mk`); also usable alone: `make -f mk/ray.mk test-ray`.
#
# The extra is `ray[data]` (pyproject.toml [ray]); it adds one ~80 MB wheel (ray 2.60, cp311
# manylinux) plus a few small dependencies: ~250 MB in the venv, about 20-30 s to install. Unlike
# vLLM it pins neither torch nor transformers, so it shares the main .venv.

VENV ?= .venv
RAY_PY := $(VENV)/bin/python
# Included from the main Makefile, the venv is built first (with its torch pin); alone, it must exist.
RAY_BASE := $(if $(BIN),$(BIN)/.installed)

.PHONY: venv-ray test-ray

venv-ray: $(VENV)/.ray-installed

$(VENV)/.ray-installed: pyproject.toml mk/ray.mk $(RAY_BASE)
	@test -x $(RAY_PY) || { echo "no $(RAY_PY): run \`make install\` first"; exit 1; }
	$(RAY_PY) -m pip install -q -e ".[ray]"
	$(RAY_PY) -c "import ray, ray.data; print('ray', ray.__version__)"
	touch $@

test-ray: $(VENV)/.ray-installed
	$(RAY_PY) -m pytest -m ray tests/ray_capture -q
