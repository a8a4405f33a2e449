"""Shard format: round trips, atomicity, manifest, corruption detection, torch adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest

import storage.run_reader as rr
from storage import (
    Encoding,
    ForeignShardError,
    FormatVersionError,
    IncompleteRunError,
    ManifestError,
    RunReader,
    ShardCorruptError,
    ShardReader,
    ShardWriter,
    build_manifest,
    claim_run_dir,
    load_manifest,
    shard_path,
)
from storage.codec import decode_positions, encode_positions, tail_from_topk
from storage.synthetic import synthetic_spec, synthetic_topk, write_synthetic_run


def by_sample(rows):
    return {r[1]: r for r in rows}


@pytest.mark.parametrize("vocab", [300, 70000])
def test_exact_encoding_round_trip_is_bit_exact(tmp_path, vocab):
    spec = synthetic_spec(k=16, vocab_size=vocab, num_shards=3, num_sequences=13, encoding=Encoding.exact())
    _, rows = write_synthetic_run(tmp_path, spec)
    want = by_sample(rows)
    reader = RunReader(tmp_path)
    assert len(reader) == 13
    seen = []
    for got in reader:
        _, sid, inp, mask, ids, lp, tail = want[got.sample_id]
        seen.append(sid)
        np.testing.assert_array_equal(got.input_ids, inp)
        np.testing.assert_array_equal(got.label_mask, mask)
        np.testing.assert_array_equal(got.topk_ids, ids)
        np.testing.assert_array_equal(got.topk_logprobs, lp)
        np.testing.assert_array_equal(got.tail_logprob, tail)
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
    assert sorted(seen) == list(range(13))


@pytest.mark.parametrize(
    "enc",
    [
        Encoding(),
        Encoding(ids="plain", logprobs="f16", tail="f16"),
        Encoding(ids="delta", logprobs="q8", q8_step=0.05),
        Encoding(ids="delta", logprobs="q8gap"),
        Encoding(ids_byte_stream_split=False, logprobs="q8"),
    ],
)
def test_compact_encodings_within_documented_bound(tmp_path, enc):
    spec = synthetic_spec(k=32, vocab_size=1000, num_shards=2, num_sequences=9, encoding=enc)
    _, rows = write_synthetic_run(tmp_path, spec)
    want = by_sample(rows)
    bound = enc.logprob_error_bound()
    for got in RunReader(tmp_path):
        _, _, inp, mask, ids, lp, tail = want[got.sample_id]
        np.testing.assert_array_equal(got.input_ids, inp)
        # Same set of (id, log-prob) pairs per position; order may differ only among quantisation ties.
        for p in range(len(ids)):
            o = np.argsort(ids[p])
            g = np.argsort(got.topk_ids[p])
            np.testing.assert_array_equal(got.topk_ids[p][g], ids[p][o])
            floor = enc.q8_floor() if enc.quantised() else -np.inf
            err = np.abs(got.topk_logprobs[p][g] - np.maximum(lp[p][o], floor))
            assert err.max() <= bound + 1e-6, (p, err.max(), bound)
        assert np.all(np.diff(got.topk_logprobs, axis=1) <= 0), "decoded log-probs must be descending"
        np.testing.assert_allclose(got.tail_logprob, tail, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    "enc", [Encoding(), Encoding(ids="delta", logprobs="q8"), Encoding(ids="delta", logprobs="q8gap")]
)
def test_q8_error_bound_at_every_rank(enc):
    rng = np.random.default_rng(1)
    ids, lp, tail = synthetic_topk(rng, 400, 5000, 128)
    e = encode_positions(ids, lp, tail, enc, 5000)
    ids2, lp2, _ = decode_positions(*e, 128, enc)
    # Compare rank by rank after aligning by id (decode order can differ only among ties).
    for p in range(len(ids)):
        a, b = np.argsort(ids[p]), np.argsort(ids2[p])
        err = np.abs(lp2[p][b] - np.maximum(lp[p][a], enc.q8_floor()))
        assert err.max() <= enc.logprob_error_bound() + 1e-6


def test_tail_from_topk_is_stable():
    lp = np.log(np.array([[0.5, 0.25, 0.25], [0.5, 0.3, 0.1], [1 - 1e-9, 1e-10, 1e-10]]))
    t = tail_from_topk(lp)
    assert t[0] == -np.inf
    np.testing.assert_allclose(t[1], np.log(0.1), rtol=1e-5)
    assert np.isfinite(t[2]) and abs(t[2] - np.log(0.8e-9)) < 0.05


def test_leftover_tmp_is_ignored_and_cleaned(tmp_path):
    spec = synthetic_spec(num_shards=2)
    claim_run_dir(tmp_path, spec)
    final = shard_path(tmp_path, 0, 2)
    final.parent.mkdir(parents=True)
    stale = final.with_name(final.name + ".12345.tmp")
    stale.write_bytes(b"PAR1 half a shard")
    other = shard_path(tmp_path, 1, 2).with_name(shard_path(tmp_path, 1, 2).name + ".999.tmp")
    other.write_bytes(b"another node is writing this one")
    with pytest.raises(IncompleteRunError, match="2 of 2 shards missing"):
        build_manifest(tmp_path)
    write_synthetic_run(tmp_path, spec)
    assert not stale.exists(), "the writer of shard 0 removes its own stale tmp"
    assert RunReader(tmp_path).manifest.rows == spec.num_sequences


def test_writer_exception_leaves_nothing(tmp_path):
    path = shard_path(tmp_path, 0, 1)
    with pytest.raises(RuntimeError):
        with ShardWriter(path, fingerprint="f", k=2, vocab_size=10, encoding=Encoding(), row_group_rows=1) as w:
            w.add(
                0,
                np.array([1, 2, 3]),
                np.array([True, True]),
                np.array([[1, 2], [3, 4]]),
                np.log(np.array([[0.5, 0.2], [0.6, 0.1]])),
            )
            raise RuntimeError("killed")
    assert list(path.parent.iterdir()) == []


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(topk_logprobs=np.array([[np.nan, -1.0], [-0.5, -1.0]])), "NaN"),
        (dict(topk_ids=np.array([[1, 10], [3, 4]])), r"\[0, 10\)"),
        (dict(topk_ids=np.array([[1, 1], [3, 4]])), "twice"),
        (dict(topk_logprobs=np.array([[-2.0, -1.0], [-0.5, -1.0]])), "descending"),
        (dict(label_mask=np.array([True])), "label_mask"),
    ],
)
def test_writer_rejects_bad_rows(tmp_path, bad, match):
    row = dict(
        input_ids=np.array([1, 2, 3]),
        label_mask=np.array([True, True]),
        topk_ids=np.array([[1, 2], [3, 4]]),
        topk_logprobs=np.log(np.array([[0.5, 0.2], [0.6, 0.1]])),
    )
    row.update(bad)
    w = ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=2, vocab_size=10, encoding=Encoding())
    with pytest.raises(ValueError, match=match):
        w.add(0, **row)


def test_claim_run_dir_refuses_other_settings(tmp_path):
    claim_run_dir(tmp_path, synthetic_spec(k=8))
    claim_run_dir(tmp_path, synthetic_spec(k=8))  # same settings: fine
    with pytest.raises(ForeignShardError, match=r"k: 8 vs 16"):
        claim_run_dir(tmp_path, synthetic_spec(k=16))
    with pytest.raises(ForeignShardError, match=r"teacher.name_or_path"):
        claim_run_dir(tmp_path, synthetic_spec(k=8, teacher="other-model"))


def test_manifest_rebuilt_from_shards_and_receipts(tmp_path):
    spec = synthetic_spec(num_shards=3, num_sequences=11)
    m1, _ = write_synthetic_run(tmp_path, spec)
    (tmp_path / "manifest.json").unlink()
    for r in (tmp_path / "shards").glob("*.receipt.json"):
        r.unlink()  # receipts lost too: rebuilt from the shards' own metadata
    m2 = build_manifest(tmp_path)
    assert [s.to_dict() for s in m2.shards] == [s.to_dict() for s in m1.shards]
    assert load_manifest(tmp_path).trained_tokens == m1.trained_tokens


def test_missing_shard_named(tmp_path):
    spec = synthetic_spec(num_shards=3)
    write_synthetic_run(tmp_path, spec)
    shard_path(tmp_path, 1, 3).unlink()
    with pytest.raises(IncompleteRunError, match="part-00001-of-00003"):
        RunReader(tmp_path)
    with pytest.raises(IncompleteRunError, match="--shard-index 1"):
        build_manifest(tmp_path)


def test_truncated_shard_detected(tmp_path):
    spec = synthetic_spec(num_shards=2)
    write_synthetic_run(tmp_path, spec)
    p = shard_path(tmp_path, 0, 2)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ShardCorruptError, match=str(p.name) + r".*truncated"):
        RunReader(tmp_path)
    with pytest.raises(ShardCorruptError):
        ShardReader(p)


def test_zero_length_shard_detected(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(num_shards=2))
    shard_path(tmp_path, 1, 2).write_bytes(b"")
    with pytest.raises(ShardCorruptError, match="part-00001-of-00002"):
        RunReader(tmp_path)


def test_flipped_bytes_fail_checksum(tmp_path):
    spec = synthetic_spec(num_shards=2, num_sequences=20)
    write_synthetic_run(tmp_path, spec)
    p = shard_path(tmp_path, 1, 2)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, different content
    p.write_bytes(bytes(data))
    reader = RunReader(tmp_path, verify="checksum")  # sizes only: shards are checked when first read
    reader[0]  # shard 0 is intact
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        reader[len(reader) - 1]  # the last row lives in shard 1
    with pytest.raises(ShardCorruptError, match="checksum mismatch"):
        list(RunReader(tmp_path, verify="checksum"))


def test_checksums_are_shared_between_processes(tmp_path, monkeypatch):
    # N processes hash each shard once between them (i % N == rank), not each shard N times.
    write_synthetic_run(tmp_path, synthetic_spec(num_shards=4, num_sequences=40))
    hashed = []
    real = rr.check_checksum
    monkeypatch.setattr(rr, "check_checksum", lambda path, receipt: (hashed.append(path.name), real(path, receipt)))
    readers = [RunReader(tmp_path, verify="checksum", checksum_share=(r, 2)) for r in range(2)]
    assert [r.owned_shards() for r in readers] == [[0, 2], [1, 3]]
    list(readers[0])  # rank 0 reads every row: hashes only its own shards
    assert sorted(hashed) == ["part-00000-of-00004.parquet", "part-00002-of-00004.parquet"]
    assert readers[0].verify_owned() == 0  # nothing left of its share
    assert readers[1].verify_owned() == 2 and readers[1].verify_owned() == 0
    assert sorted(hashed) == sorted(shard_path(tmp_path, i, 4).name for i in range(4))
    # a corrupt shard is found by its owner's background check, whoever reads it
    p = shard_path(tmp_path, 3, 4)
    data = bytearray(p.read_bytes())
    data[len(data) // 3] ^= 0xFF
    p.write_bytes(bytes(data))
    assert RunReader(tmp_path, verify="checksum", checksum_share=(0, 2)).verify_owned() == 2
    with pytest.raises(ShardCorruptError, match="part-00003-of-00004.*checksum mismatch"):
        RunReader(tmp_path, verify="checksum", checksum_share=(1, 2)).verify_owned()
    with pytest.raises(ValueError, match="checksum_share"):
        RunReader(tmp_path, checksum_share=(2, 2))


def test_shard_from_another_run_detected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_run(a, synthetic_spec(num_shards=2))
    write_synthetic_run(b, synthetic_spec(num_shards=2, teacher="another-teacher"))
    for suffix in ("", ".receipt.json"):
        src = shard_path(b, 1, 2).with_name(shard_path(b, 1, 2).name + suffix)
        dst = shard_path(a, 1, 2).with_name(shard_path(a, 1, 2).name + suffix)
        dst.write_bytes(src.read_bytes())
    with pytest.raises(ForeignShardError, match="another run"):
        build_manifest(a)
    # Even when a matching receipt is forged, opening the shard checks its embedded fingerprint.
    with pytest.raises(ForeignShardError):
        list(RunReader(a, verify="size"))


def test_shard_of_other_split_detected(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(num_shards=2))
    (tmp_path / "shards" / "part-00000-of-00004.parquet").write_bytes(b"x")
    with pytest.raises(ForeignShardError, match="4 shards"):
        build_manifest(tmp_path)


def test_hand_edited_manifest_detected(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(k=8))
    path = tmp_path / "manifest.json"
    d = json.loads(path.read_text())
    d["k"] = 4
    path.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="edited by hand"):
        load_manifest(tmp_path)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_format_version_checked(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec())
    path = tmp_path / "manifest.json"
    d = json.loads(path.read_text())
    d["format_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(FormatVersionError, match="version 99"):
        load_manifest(tmp_path)


def test_unfinalized_run_says_what_to_do(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(), finalize=False)
    with pytest.raises(IncompleteRunError, match="--finalize"):
        RunReader(tmp_path)


def test_random_access_matches_iteration(tmp_path):
    write_synthetic_run(tmp_path, synthetic_spec(num_shards=3, num_sequences=17))
    r = RunReader(tmp_path)
    rows = list(r)
    for i in [16, 0, 5, 5, 11, 3]:
        assert r[i].sample_id == rows[i].sample_id
        np.testing.assert_array_equal(r[i].topk_ids, rows[i].topk_ids)
    with pytest.raises(IndexError):
        r[17]


def _variable_rows(rng, n, k, vocab, sampled):
    ids, lp, tail = synthetic_topk(rng, n, vocab, k)
    counts = rng.integers(1, k + 1, size=n)
    valid = np.arange(k)[None, :] < counts[:, None]
    ids = np.where(valid, ids, -1)
    lp = np.where(valid, lp, -np.inf).astype(np.float32)
    draws = np.where(valid, rng.integers(0 if sampled == "hybrid" else 1, 5, size=(n, k)), 0) if sampled else None
    return ids, lp, tail, draws


@pytest.mark.parametrize("enc", [Encoding.exact(), Encoding(), Encoding(ids="delta", logprobs="q8")])
@pytest.mark.parametrize("sampled", [None, "sample", "hybrid"])
def test_variable_count_round_trip(tmp_path, enc, sampled):
    if sampled and enc.ids == "delta":
        with pytest.raises(ValueError, match="ids=plain"):
            ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=4, vocab_size=50, encoding=enc, sampled=True)
        return
    rng = np.random.default_rng(5)
    k, vocab = 12, 300
    path = shard_path(tmp_path, 0, 1)
    want = []
    with ShardWriter(
        path,
        fingerprint="f",
        k=k,
        vocab_size=vocab,
        encoding=enc,
        row_group_rows=3,
        variable=True,
        sampled=bool(sampled),
    ) as w:
        for sid in range(7):
            T = int(rng.integers(3, 20))
            mask = rng.random(T - 1) < 0.7
            ids, lp, tail, draws = _variable_rows(rng, int(mask.sum()), k, vocab, sampled)
            w.add(sid, rng.integers(0, vocab, T), mask, ids, lp, tail, sample_counts=draws)
            want.append((ids, lp, tail, draws))
        w.close()
    got = list(ShardReader(path))
    bound = enc.logprob_error_bound()
    for row, (ids, lp, _tail, draws) in zip(got, want):
        assert row.topk_ids.shape == ids.shape
        np.testing.assert_array_equal(row.topk_ids >= 0, ids >= 0)  # same counts per position
        for p in range(len(ids)):
            v = ids[p] >= 0
            a, b = np.argsort(ids[p][v]), np.argsort(row.topk_ids[p][v])
            np.testing.assert_array_equal(row.topk_ids[p][v][b], ids[p][v][a])
            floor = enc.q8_floor() if enc.quantised() else -np.inf
            assert np.abs(row.topk_logprobs[p][v][b] - np.maximum(lp[p][v][a], floor)).max() <= bound + 1e-6
            assert np.isneginf(row.topk_logprobs[p][~v]).all()
            if draws is not None:
                np.testing.assert_array_equal(row.sample_counts[p][v][b], draws[p][v][a])
        if draws is None:
            assert row.sample_counts is None


def test_variable_padding_must_be_a_suffix(tmp_path):
    w = ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=3, vocab_size=10, encoding=Encoding(), variable=True)
    with pytest.raises(ValueError, match="prefix"):
        w.add(0, np.array([1, 2]), np.array([True]), np.array([[-1, 3, 4]]), np.array([[-np.inf, -1.0, -2.0]]))
    fixed = ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=3, vocab_size=10, encoding=Encoding())
    with pytest.raises(ValueError, match="variable-count run"):
        fixed.add(0, np.array([1, 2]), np.array([True]), np.array([[3, -1, -1]]), np.array([[-1.0, -np.inf, -np.inf]]))
