"""The sampled modes' draws (`head_scoring.inverse_cdf_draws` and `HFEngine.score(..., uniforms=)`): the inverse
CDF of the teacher distribution, checked against a plain fp64 sequential inverse CDF, by frequencies, and
through the engine against an independent forward."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from stage1_teacher.capture_modes import draw_uniforms
from stage1_teacher.engines.head_scoring import default_chunk_positions, inverse_cdf_draws
from stage1_teacher.engines.hf_engine import HFEngine


def _reference_draws(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The textbook inverse CDF in fp64: the first id whose cumulative mass reaches u · total."""
    cdf = np.cumsum(p.astype(np.float64), axis=1)
    ids = np.stack([np.searchsorted(cdf[i], u[i] * cdf[i, -1], side="left") for i in range(len(p))])
    return np.minimum(ids, p.shape[1] - 1)


@pytest.mark.parametrize("V", [5, 77, 128, 300, 4099])
def test_draws_equal_the_sequential_inverse_cdf(V):
    # block boundaries inside and at the edge of the vocabulary (block 128), peaked and flat rows
    rng = np.random.default_rng(V)
    C, N = 64, 16
    z = torch.from_numpy(rng.normal(size=(C, V)) * rng.choice([0.5, 3.0, 8.0], size=(C, 1))).float()
    p = torch.softmax(z, -1)
    u = 1.0 - rng.random((C, N))
    ids, total = inverse_cdf_draws(p, torch.from_numpy(u))
    ref = _reference_draws(p.numpy(), u)
    agree = (ids.numpy() == ref).mean()
    # fp32 block sums may move a boundary by ~1e-7 of the mass: a different id only when u lands there
    assert agree >= 0.999, agree
    np.testing.assert_allclose(total.numpy(), p.double().sum(-1).numpy(), rtol=1e-6)
    assert (p.numpy()[np.arange(C)[:, None], ids.numpy()] > 0).all()  # never an id without mass


def test_draw_frequencies_follow_the_distribution():
    # 300 ids: two full blocks and a partial one; zero-mass ids, including a whole zero block and the last id
    rng = np.random.default_rng(0)
    p = rng.random(300) ** 4
    p[128:256] = 0.0
    p[[0, 17, 299]] = 0.0
    p[260] = 5.0  # one heavy id in the partial block
    n = 200_000
    u = 1.0 - rng.random((1, n))
    ids, _ = inverse_cdf_draws(torch.from_numpy(p).float()[None], torch.from_numpy(u))
    counts = np.bincount(ids.numpy().ravel(), minlength=300)
    expect = n * p / p.sum()
    assert counts[p == 0].sum() == 0
    z = (counts - expect) / np.sqrt(np.maximum(expect * (1 - p / p.sum()), 1e-12))
    assert np.abs(z[p > 0]).max() < 5.5, np.abs(z).max()  # 5.5 sigma over ~170 ids: a false alarm < 1e-5


def test_empty_rows_draw_nothing():
    p = torch.zeros(3, 300)
    p[1, 5] = 1.0
    p[2, 299] = 2.0
    ids, total = inverse_cdf_draws(p, torch.full((3, 4), 0.5, dtype=torch.float64))
    assert ids.tolist() == [[-1] * 4, [5] * 4, [299] * 4]
    assert total.tolist() == [0.0, 1.0, 2.0]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return HFEngine(tiny_model_dir, dtype="float32", device="cpu", chunk_positions=7)


@pytest.fixture(scope="module")
def sequences(engine):
    rng = np.random.default_rng(1)
    return [rng.integers(0, engine.vocab_size, n).astype(np.int32) for n in (2, 9, 30, 41)]


@pytest.mark.parametrize("head_k", [0, 4])
def test_engine_draws_match_an_independent_forward(engine, sequences, tiny_model_dir, head_k):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    uniforms = [draw_uniforms(3, i, len(s) - 1, 8) for i, s in enumerate(sequences)]
    out = engine.score(sequences, head_k, uniforms=uniforms, tail_only=head_k > 0)
    same = total = 0
    for ids, u, top in zip(sequences, uniforms, out):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, :-1].float(), -1)
        assert top.ids.shape == top.logprobs.shape == (len(ids) - 1, head_k)
        dist = lp.exp().numpy().astype(np.float64)
        if head_k:
            vals, idx = lp.topk(head_k, -1)
            np.testing.assert_array_equal(top.ids, idx.numpy())
            np.testing.assert_allclose(top.logprobs, vals.numpy(), atol=1e-5, rtol=0)
            tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
            np.testing.assert_allclose(top.tail_logprob, tail.numpy(), atol=1e-5, rtol=0)
            np.put_along_axis(dist, idx.numpy(), 0.0, axis=1)  # draws come from the tail only
            for r in range(len(ids) - 1):  # never a head id
                assert not np.isin(top.sample_ids[r], idx.numpy()[r]).any()
        else:
            np.testing.assert_array_equal(top.tail_logprob, 0.0)  # an empty head leaves all the mass outside
        ref = _reference_draws(dist, u)
        same += (top.sample_ids == ref).sum()
        total += ref.size
        np.testing.assert_allclose(
            top.sample_logprobs, np.take_along_axis(lp.numpy(), top.sample_ids.astype(np.int64), 1), atol=1e-5
        )
    assert same / total >= 0.999, same / total


def test_engine_draws_do_not_depend_on_batching_or_chunking(engine, sequences, tiny_model_dir):
    uniforms = [draw_uniforms(5, i, len(s) - 1, 8) for i, s in enumerate(sequences)]
    together = engine.score(sequences, 0, uniforms=uniforms)
    other = HFEngine(tiny_model_dir, dtype="float32", device="cpu", chunk_positions=1000)
    for s, u, a in zip(sequences, uniforms, together):
        (b,) = other.score([s], 0, uniforms=[u])
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_allclose(a.sample_logprobs, b.sample_logprobs, atol=1e-6)


def test_k_zero_needs_uniforms(engine, sequences):
    with pytest.raises(ValueError, match="k=0"):
        engine.score(sequences, 0)


def test_chunks_shrink_for_large_vocabularies(tiny_model_dir):
    # one (C, V) fp32 buffer stays <= 256 MiB: SmolLM2's 49k and the tiny model keep 1024 positions
    assert [default_chunk_positions(v) for v in (384, 49_152, 65_536, 128_256, 262_144)] == [1024, 1024, 1024, 523, 256]
    assert HFEngine(tiny_model_dir, dtype="float32", device="cpu").chunk_positions == 1024
