"""Fixtures for end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import cli


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_corpus_dir) -> Path:
    """A finalised run of the tiny model over the text corpus holding the FULL distribution (k = vocab),
    so stage-2 tests can compare against exact KLs."""
    out = tmp_path_factory.mktemp("runs") / "full"
    cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--out",
        out,
        "--capture",
        "topk",
        "--top-k",
        384,
        "--seq-len",
        32,
        "--num-shards",
        2,
        "--encoding",
        "exact",
    )
    return out
