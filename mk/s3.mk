# Run directories on S3: the `s3` extra (boto3 for conditional writes, moto's server for a real S3-compatible
# endpoint on 127.0.0.1) installed into the project's .venv, and the tests that need it.
# Included from the main Makefile (`-include mk/*.mk`); also usable alone: `make -f mk/s3.mk test-s3`.
# The extra is small (boto3, moto, flask, werkzeug: ~40 MB, seconds to install); nothing pins torch.

VENV ?= .venv
S3_PY := $(VENV)/bin/python
S3_BASE := $(if $(BIN),$(BIN)/.installed)

.PHONY: venv-s3 test-s3

venv-s3: $(VENV)/.s3-installed

$(VENV)/.s3-installed: pyproject.toml mk/s3.mk $(S3_BASE)
	@test -x $(S3_PY) || { echo "no $(S3_PY): run \`make install\` first"; exit 1; }
	$(S3_PY) -m pip install -q -e ".[s3]"
	$(S3_PY) -c "import boto3, moto.server; print('boto3', boto3.__version__)"
	touch $@

test-s3: $(VENV)/.s3-installed
	$(S3_PY) -m pytest -m s3 tests/s3 -q
