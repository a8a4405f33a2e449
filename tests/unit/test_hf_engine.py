import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm.tokenizer_id import tokenizer_fingerprint
from stage1_teacher.engines.base import TopK
from stage1_teacher.engines.factory import make_engine
from stage1_teacher.engines.hf_engine import HFEngine
from storage import tail_from_topk

K = 8
LENGTHS = (1, 2, 7, 23, 40)  # ragged on purpose: padding, a 0-row and a 1-row sequence


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    # chunk_positions=5 puts chunk boundaries inside sequences
    return HFEngine(tiny_model_dir, dtype="float32", device="cpu", chunk_positions=5)


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(engine):
    rng = np.random.default_rng(0)
    return [rng.integers(0, engine.vocab_size, n).astype(np.int32) for n in LENGTHS]


@pytest.fixture(scope="module")
def scored(engine, batch):
    return engine.score(batch, K)


def _reference_logprobs(model, ids) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits
    return torch.log_softmax(logits.float(), -1)[0, :-1]  # (T-1, V)


def test_topk_matches_an_independent_forward(scored, batch, reference_model):
    assert len(scored) == len(batch)
    for ids, out in zip(batch, scored):
        assert isinstance(out, TopK)
        assert out.ids.shape == out.logprobs.shape == (len(ids) - 1, K) and out.tail_logprob.shape == (len(ids) - 1,)
        assert out.ids.dtype == np.int32 and out.logprobs.dtype == np.float32 and out.tail_logprob.dtype == np.float32
        if len(ids) == 1:
            continue
        ref = _reference_logprobs(reference_model, ids)
        vals, idx = ref.topk(K, -1)
        np.testing.assert_array_equal(out.ids, idx.numpy())
        np.testing.assert_allclose(out.logprobs, vals.numpy(), atol=1e-5, rtol=0)
        assert (np.diff(out.logprobs, axis=-1) <= 0).all()
        rest = ref.scatter(-1, idx, float("-inf")).logsumexp(-1)
        np.testing.assert_allclose(out.tail_logprob, rest.numpy(), atol=1e-5, rtol=0)
        # the stored distribution (top-k + tail) sums to one
        total = np.logaddexp(np.logaddexp.reduce(out.logprobs, axis=-1), out.tail_logprob)
        np.testing.assert_allclose(total, 0.0, atol=1e-5)


def test_result_does_not_depend_on_chunking_or_batching(engine, batch, scored):
    whole = HFEngine(engine.name_or_path, chunk_positions=4096)
    for alone, together in zip([whole.score([b], K)[0] for b in batch], scored):
        np.testing.assert_array_equal(alone.ids, together.ids)
        np.testing.assert_allclose(alone.logprobs, together.logprobs, atol=1e-5)
        np.testing.assert_allclose(alone.tail_logprob, together.tail_logprob, atol=1e-5)


def test_full_vocabulary_has_an_empty_tail(engine, batch):
    out = engine.score(batch[2:3], engine.vocab_size)[0]
    assert np.isneginf(out.tail_logprob).all()
    np.testing.assert_allclose(np.logaddexp.reduce(out.logprobs, axis=-1), 0.0, atol=1e-5)
    assert sorted(out.ids[0].tolist()) == list(range(engine.vocab_size))


def test_bad_k_and_bad_ids_are_clear_errors(engine, batch):
    with pytest.raises(ValueError, match=f"k=10000 exceeds the vocabulary size {engine.vocab_size}"):
        engine.score(batch, 10_000)
    with pytest.raises(ValueError, match="positive int"):
        engine.score(batch, 0)
    with pytest.raises(ValueError, match="outside"):
        engine.score([np.array([1, engine.vocab_size])], K)
    with pytest.raises(ValueError, match="non-empty"):
        engine.score([np.array([], dtype=np.int32)], K)
    assert engine.score([], K) == []


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path does not exist: .*no-such-model"):
        HFEngine(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFEngine(tmp_path)


def test_forward_only_is_the_plain_forward(engine, batch, reference_model):
    logits = engine.forward_only(batch)
    assert logits.shape == (len(batch), max(LENGTHS), engine.vocab_size)
    ref = _reference_logprobs(reference_model, batch[3])
    np.testing.assert_allclose(
        torch.log_softmax(logits[3, : LENGTHS[3] - 1].float(), -1).numpy(), ref.numpy(), atol=1e-5
    )


def test_tail_from_topk_is_stable():
    probs = np.array([[0.5, 0.25], [0.999999, 1e-7], [0.7, 0.3], [0.8, 0.3]])
    tail = tail_from_topk(np.log(probs))
    assert tail.dtype == np.float32
    np.testing.assert_allclose(tail[:2], np.log([0.25, 1 - 0.999999 - 1e-7]), rtol=1e-4)
    assert np.isneginf(tail[3])  # mass above one (rounding) clamps to an empty tail
    assert tail[2] < -30 or np.isneginf(tail[2])


def test_make_engine(tiny_model_dir):
    with pytest.raises(ValueError, match="unknown engine 'bogus'"):
        make_engine("bogus", str(tiny_model_dir), dtype="float32", device="cpu")
    if not torch.cuda.is_available():
        e = make_engine("auto", str(tiny_model_dir), dtype="float32", device="cpu")
        assert isinstance(e, HFEngine) and e.name == "hf" and e.dtype == "float32"


def test_fingerprints(engine, tiny_model_dir, tiny_tokenizer_dir):
    fp = engine.fingerprint()
    assert fp["name_or_path"] == str(tiny_model_dir)
    assert len(fp["config_sha256"]) == len(fp["weights_sha256"]) == 64
    assert fp == engine.fingerprint()
    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    b = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    assert a == b  # the builders are deterministic, so the two fixtures hold the same tokenizer
    assert a["vocab_size"] == engine.vocab_size and a["eos_token_id"] == 2 and a["pad_token_id"] == 0


@pytest.mark.parametrize("scale", [0.3, 3.0, 8.0, 30.0])  # flat ... peaked rows, both sides of the threshold
def test_fast_tail_matches_summing_the_rest_of_the_distribution(scale):
    """`topk_and_tail` takes log(1 - Σ p_topk) where that does not cancel and sums the rest elsewhere:
    the same ids and log-probs as topk, and the tail of an explicit masked logsumexp in fp64 to 1e-5 plus
    what the fp32 input allows. log(1 - Σ p_topk) assumes the fp32 log-probs sum to exactly 1; their
    normalisation error (|Σ p - 1|, ~1e-6 with AVX2's exp, less with AVX-512's) is divided by the tail mass
    (>= _TAIL_DIRECT_MIN on this path), so the bound grows as 1/tail mass, at most 20x that error."""
    from stage1_teacher.engines.head_scoring import _TAIL_DIRECT_MIN, topk_and_tail

    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(400, 3000, generator=g) * scale
    lp = torch.log_softmax(logits, dim=-1)
    vals, idx, tail = topk_and_tail(lp.clone(), 16)
    ref_vals, ref_idx = torch.topk(lp, 16, dim=-1)
    ref_tail = torch.logsumexp(torch.log_softmax(logits.double(), dim=-1).scatter(-1, ref_idx, float("-inf")), dim=-1)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    norm_err = torch.logsumexp(lp.double(), dim=-1).abs()  # |log Σ p| of the fp32 input, per row
    bound = 1e-5 + 1.5 * norm_err / ref_tail.exp().clamp(min=_TAIL_DIRECT_MIN)
    err = (tail.double() - ref_tail).abs()
    assert (err <= bound).all(), f"row {int((err - bound).argmax())}: error {float(err.max()):.3g}"
    both = (ref_tail.exp() > _TAIL_DIRECT_MIN).any() and (ref_tail.exp() < _TAIL_DIRECT_MIN).any()
    assert both or scale in (0.3, 30.0)  # the middle scales exercise both paths in one call
    # k = V: nothing outside the top k
    _, _, empty = topk_and_tail(lp[:5].clone(), 3000)
    assert torch.isneginf(empty).all()
