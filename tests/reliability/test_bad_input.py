"""Bad input gets a specific error (the file, row, sample or option named), a non-zero exit code through
the CLI, and leaves everything already written untouched (byte for byte, same mtimes).

Already covered elsewhere, not repeated: a hand-edited manifest, format version, truncated / foreign
shards (tests/unit/test_storage.py), a student tokenizer with swapped ids, --top-k 0 and 100000,
--seq-len 4096 (tests/e2e)."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
from e2e_helpers import cli
from reliability_helpers import all_tmps, final_shards, sha256, snapshot
from tiny_models import TINY_VOCAB_SIZE
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage1_teacher.engines.hf_engine import HFEngine
from storage import Encoding, RunReader, ShardWriter, load_manifest, shard_path
from storage.layout import receipt_path


def _small_run(root, tiny_model_dir, tiny_corpus_dir):
    """A finished run (k=4, seq 32, 2 shards) of a private copy of the tiny model: (run, model, args)."""
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    args = [
        "--model",
        model,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        4,
        "--seq-len",
        32,
        "--num-shards",
        2,
        "--out",
        root / "run",
    ]
    cli("teacher", *args)
    return root / "run", model, args


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, tiny_model_dir, tiny_corpus_dir):
    """Shared by tests that must leave it untouched (they check that they do)."""
    return _small_run(tmp_path_factory.mktemp("small"), tiny_model_dir, tiny_corpus_dir)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------
# a run directory, a student, or a model context that does not fit


def test_teacher_into_run_dir_of_a_different_tokenizer(tmp_path, tiny_model_dir, tiny_corpus_dir):
    run, model, args = _small_run(tmp_path, tiny_model_dir, tiny_corpus_dir)
    before = snapshot(run)
    tok = json.loads((model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same model folder, same weights: only the tokenizer differs
    (model / "tokenizer.json").write_text(json.dumps(tok))
    r = cli("teacher", *args, expect_ok=False)
    assert r.exit_code != 0 and "different settings" in r.output and "tokenizer.hash" in r.output, r.output
    assert "Traceback" not in r.output
    assert "teacher.weights_sha256" not in r.output, "names what differs, nothing else"
    assert str(run) in r.output and "new --out" in r.output
    assert snapshot(run) == before


def _student_copy(tiny_model_dir, dest, *, vocab=None, max_positions=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    if max_positions is not None:
        model.config.max_position_embeddings = max_positions
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(dest)  # the same tokenizer
    return dest


def test_student_with_resized_vocabulary_is_refused(tmp_path, tiny_run, tiny_model_dir):
    other = _student_copy(tiny_model_dir, tmp_path / "resized", vocab=TINY_VOCAB_SIZE + 16)
    before = snapshot(tiny_run)
    out = tmp_path / "s"
    r = cli(
        "student",
        "--run-dir",
        tiny_run,
        "--out",
        out,
        "--model",
        other,
        "--max-steps",
        1,
        "--verify",
        "size",
        expect_ok=False,
    )
    assert (
        r.exit_code != 0
        and "vocab_size" in r.output
        and f"{TINY_VOCAB_SIZE + 16} vs the teacher's {TINY_VOCAB_SIZE}" in r.output
    )
    assert "tokenizer.hash" not in r.output, "same tokenizer: only the vocabulary is named"
    assert "Traceback" not in r.output and str(other) in r.output, "names the student folder"
    assert not out.exists(), "refused before anything is written"
    assert snapshot(tiny_run) == before


def test_student_context_shorter_than_the_stored_sequences_is_refused(tmp_path, tiny_run, tiny_model_dir):
    seq_len = load_manifest(tiny_run).spec.seq_len
    other = _student_copy(tiny_model_dir, tmp_path / "short", max_positions=seq_len // 2)
    out = tmp_path / "s"
    r = cli(
        "student",
        "--run-dir",
        tiny_run,
        "--out",
        out,
        "--model",
        other,
        "--max-steps",
        1,
        "--verify",
        "size",
        expect_ok=False,
    )
    assert r.exit_code != 0 and "max_position_embeddings" in r.output, r.output
    assert "Traceback" not in r.output and str(other) in r.output, "names the student folder"
    assert f"{seq_len}" in r.output and f"{seq_len // 2}" in r.output
    assert not out.exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--top-k", -1, "--top-k -1: must be >= 1"),
        (
            "--top-k",
            TINY_VOCAB_SIZE + 1,
            f"--top-k {TINY_VOCAB_SIZE + 1} is larger than the teacher's vocabulary ({TINY_VOCAB_SIZE})",
        ),
        ("--seq-len", 513, "--seq-len 513 exceeds the teacher's context (512 positions)"),
        ("--seq-len", 1, "--seq-len 1: must be >= 2"),
    ],
)
def test_bad_option_into_an_existing_run_leaves_it_untouched(small_run, option, value, message):
    run, _, args = small_run
    before = snapshot(run)
    i = args.index(option)
    r = cli("teacher", *args[:i], option, value, *args[i + 2 :], expect_ok=False)
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output
    assert snapshot(run) == before


def test_k_out_of_range_at_the_storage_layer(tmp_path):
    for k in (0, -3, 11):
        with pytest.raises(ValueError, match=rf"k={k} must be in 1..vocab_size \(10\)"):
            ShardWriter(shard_path(tmp_path, 0, 1), fingerprint="f", k=k, vocab_size=10, encoding=Encoding())
    assert not (tmp_path / "shards").exists() or list((tmp_path / "shards").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# corpus rows


def test_invalid_text_rows_are_counted_and_named(tmp_path, tiny_model_dir, caplog):
    good = [
        "The teacher model reads every sequence once.",
        "A student learns from those guesses.",
        "Rain fell on the old stone bridge.",
    ] * 4
    rows = [{"text": t} for t in good]
    bad_rows = {
        1: {"text": ""},
        3: {"text": 12345},
        4: {"text": None},
        6: {"text": "   "},
        9: {"text": ["a", "list"]},
        10: {"other": "no text field"},
    }
    for i in sorted(bad_rows):
        rows.insert(i, bad_rows[i])
    data = _write_jsonl(tmp_path / "mixed.jsonl", rows)
    clean = _write_jsonl(tmp_path / "clean.jsonl", [{"text": t} for t in good])
    common = ["--model", tiny_model_dir, "--capture", "topk", "--top-k", 4, "--seq-len", 32]
    with caplog.at_level(logging.WARNING, logger="lm.corpus"):
        cli("teacher", *common, "--data", data, "--out", tmp_path / "mixed")
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "lm.corpus")
    assert "skipped 6 rows: 6 empty or non-string rows (rows 2, 4, 5, 7, 10, ...)" in msg, msg
    cli("teacher", *common, "--data", clean, "--out", tmp_path / "clean")
    # The skipped rows contributed nothing: the same stored sequences as the clean corpus (the corpus
    # fingerprint of a run names its input files, so it differs; the content does not).
    a, b = list(RunReader(tmp_path / "mixed")), list(RunReader(tmp_path / "clean"))
    assert [r.input_ids.tolist() for r in a] == [r.input_ids.tolist() for r in b]


def test_invalid_chat_rows_are_counted_and_named(tmp_path, tiny_model_dir, caplog):
    ok = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
    rows = [
        {"messages": ok},
        {"messages": "not a list"},
        {"messages": []},
        {"messages": ok},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 7}]},
        {"messages": [{"role": 3, "content": "x"}]},
        {"messages": None},
        {"messages": ok},
    ]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lm.corpus"):
        cli(
            "teacher",
            "--model",
            tiny_model_dir,
            "--data",
            data,
            "--messages-field",
            "messages",
            "--capture",
            "topk",
            "--top-k",
            4,
            "--seq-len",
            32,
            "--out",
            tmp_path / "run",
        )
    msg = " ".join(r.getMessage() for r in caplog.records if r.name == "lm.corpus")
    assert "skipped 6 rows: 6 malformed conversations" in msg and "(rows 2, 3, 5, 6, 7, ...)" in msg, msg
    assert len(RunReader(tmp_path / "run")) >= 1


@pytest.mark.parametrize(
    "field, rows",
    [
        ("text", [{"text": ""}, {"text": 5}, {"text": None}, {"text": "  \n "}]),
        ("messages", [{"messages": "x"}, {"messages": []}, {"messages": [{"role": "user"}]}]),
    ],
)
def test_corpus_with_nothing_valid_is_an_error(tmp_path, tiny_model_dir, field, rows):
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    extra = ["--messages-field", "messages"] if field == "messages" else []
    r = cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        data,
        *extra,
        "--capture",
        "topk",
        "--top-k",
        4,
        "--seq-len",
        32,
        "--out",
        out,
        expect_ok=False,
    )
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert "bad.jsonl" in r.output and "no trainable position" in r.output
    assert f"read {len(rows)} rows, skipped {len(rows)}" in r.output
    assert not out.exists(), "nothing written"


# ---------------------------------------------------------------------------------------------------
# NaN / inf from an engine


def _poisoned_score(monkeypatch, target: int, kind: str):
    """HFEngine.score with one bad value at `target`'s first position (batch size 1: call n scores sample n)."""
    real = HFEngine.score
    calls = {"n": 0}

    def score(self, batch, k, **kw):
        tops = real(self, batch, k, **kw)
        if calls["n"] == target:
            top = tops[0]
            if kind == "nan":
                top.logprobs[0, 0] = np.nan
            elif kind == "posinf":
                top.logprobs[0, 0] = np.inf
            else:
                top.tail_logprob[0] = np.nan
        calls["n"] += len(batch)
        return tops

    monkeypatch.setattr(HFEngine, "score", score)


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model_dir, tiny_corpus_dir):
    """(args without --out, run dir): an uninterrupted run, one sequence per engine call."""
    args = [
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        4,
        "--seq-len",
        32,
        "--num-shards",
        2,
        "--batch-size",
        1,
        "--encoding",
        "exact",
    ]
    ref = tmp_path_factory.mktemp("scored") / "ref"
    cli("teacher", *args, "--out", ref)
    return args, ref


@pytest.mark.parametrize(
    "kind, message",
    [
        ("nan", "NaN or +inf log-probs"),
        ("posinf", "NaN or +inf log-probs"),
        ("tail", "tail_logprob must be a log-probability"),
    ],
)
def test_nan_or_inf_from_the_engine_is_refused(tmp_path, monkeypatch, scored_run, kind, message):
    args, ref = scored_run
    rows = list(RunReader(ref))
    target = len(rows) - 3  # the engine call that scores this row: in shard 1, after shard 0 is finished
    _poisoned_score(monkeypatch, target, kind)
    out = tmp_path / "run"
    r = cli("teacher", *args, "--out", out, expect_ok=False)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert f"part-00001-of-00002.parquet, sample_id {rows[target].sample_id}" in r.output
    assert [p.name for p in final_shards(out)] == ["part-00000-of-00002.parquet"], "no partial shard 1"
    assert not receipt_path(shard_path(out, 1, 2)).exists() and all_tmps(out) == []
    assert not (out / "manifest.json").exists()
    assert sha256(shard_path(out, 0, 2)) == load_manifest(ref).shards[0].sha256, "shard 0 intact"


@pytest.mark.timeout(120)
def test_engine_error_with_a_full_writer_queue_fails_instead_of_hanging(
    tmp_path, monkeypatch, tiny_model_dir, tiny_corpus_dir
):
    """The writer thread fails on a row while the engine has already queued the shard's last batches: the
    run must stop with the error, not wait forever for a writer that is gone."""
    args = [
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        4,
        "--seq-len",
        32,
        "--batch-size",
        1,
        "--encoding",
        "exact",
        "--max-samples",
        12,
    ]
    n_seq = 12  # the sequences of --max-samples 12 at --seq-len 32 (checked below: the engine must score them all)
    target = n_seq - 5  # the queue holds 4 batches: when this one fails, the last 4 wait behind it
    _poisoned_score(monkeypatch, target, "nan")
    scored, engine_done = [0], threading.Event()
    poisoned_score = HFEngine.score

    def score(self, batch, k, **kw):
        tops = poisoned_score(self, batch, k, **kw)
        scored[0] += len(batch)
        if scored[0] == n_seq:
            engine_done.set()
        return tops

    monkeypatch.setattr(HFEngine, "score", score)
    real_add = ShardWriter.add

    def add_after_the_engine_is_done(self, sample_id, *a, **kw):
        # The writer reaches the bad row only once the engine has scored every batch (an event, not a
        # sleep): the batches behind it fill the queue. The wait's timeout is a hang guard only.
        if sample_id == target and not engine_done.wait(timeout=60):
            raise AssertionError(f"the engine scored {scored[0]} of {n_seq} sequences; the corpus changed?")
        return real_add(self, sample_id, *a, **kw)

    monkeypatch.setattr(ShardWriter, "add", add_after_the_engine_is_done)
    out = tmp_path / "run"
    r = cli("teacher", *args, "--out", out, expect_ok=False)
    assert r.exit_code != 0 and f"sample_id {target}" in r.output and "NaN" in r.output, r.output
    assert "Traceback" not in r.output
    assert final_shards(out) == [] and all_tmps(out) == []


def test_student_on_a_corrupt_shard_stops_with_the_shard_named(tmp_path, tiny_run, tiny_model_dir):
    # The shard's sha256 is checked by this process's background check (its share: every shard, one process),
    # even for a run too short to read that shard's rows: the error names it and there is no traceback.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    p = run / "shards" / "part-00001-of-00002.parquet"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    p.write_bytes(bytes(data))
    r = cli(
        "student",
        "--run-dir",
        run,
        "--out",
        tmp_path / "s",
        "--model",
        tiny_model_dir,
        "--max-steps",
        1,
        expect_ok=False,
    )
    assert r.exit_code != 0 and "part-00001-of-00002.parquet: checksum mismatch" in r.output
    assert "Traceback" not in r.output
