"""Session-wide fixtures shared by every test module: tiny tokenizer, model and corpus.

They are built once per session into pytest's temporary directory (about a second in all);
tests must treat them as read-only and copy them if they need to change anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `tests` is not a package; make `tiny_models` importable from any test module and bench.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Property tests: the default run (CI, `make test`) replays the same examples every time, so a landing
# never depends on the draw; `HYPOTHESIS_PROFILE=explore` searches 20x wider with fresh random seeds
# and is how new counterexamples are hunted (then pinned with @example).
import os  # noqa: E402

from tiny_models import build_tiny_model, build_tiny_tokenizer, write_tiny_corpus  # noqa: E402

try:  # the vLLM and Ray venvs run their own tests without hypothesis
    from hypothesis import settings
except ImportError:
    settings = None
if settings is not None:
    settings.register_profile("ci", max_examples=60, derandomize=True, print_blob=True)
    settings.register_profile("explore", max_examples=1000, derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A saved byte-level BPE tokenizer (vocab 384) with <s>, </s>, <pad> and a ChatML template."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer plus a seeded random 2-layer LlamaForCausalLM, saved as safetensors."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), seed=0)


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """`text.jsonl` (40 rows, one empty, one non-string) and `chat.jsonl` (20 conversations)."""
    return write_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"))
