"""Determinism of stage 1: the same settings give byte-identical shards (test_faults.py and the e2e tests
prove it across kills and processes). The batch size is not part of the run's identity, so a resume with
another --batch-size is accepted; its shards then agree with the others only to the compute dtype's
rounding, because padding and batch shape change the order of floating-point reductions."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_helpers import cli

from storage import RunReader, load_run_spec


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 0.1)])
def test_batch_composition_changes_values_only_by_rounding(tmp_path, tiny_model_dir, tiny_corpus_dir, dtype, atol):
    args = [
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        32,
        "--no-pack",
        "--max-samples",
        12,
        "--encoding",
        "exact",
        "--dtype",
        dtype,
    ]
    runs = {}
    for b in (1, 5):  # one sequence per call vs padded batches of unequal lengths
        cli("teacher", *args, "--batch-size", b, "--out", tmp_path / f"b{b}")
        runs[b] = list(RunReader(tmp_path / f"b{b}"))
    assert load_run_spec(tmp_path / "b1").fingerprint == load_run_spec(tmp_path / "b5").fingerprint
    for a, b in zip(runs[1], runs[5]):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        # Sorted values: robust to two near-tied ids trading places.
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=atol, rtol=0)
        np.testing.assert_allclose(a.tail_logprob, b.tail_logprob, atol=atol, rtol=0)
