"""`pipeline student --eval-data NAME=PATH --eval-every N --report-to ...`: the logged retention numbers equal
`pipeline eval`'s on the same model, and the trackers get the same numbers as metrics.jsonl (read back offline)."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from e2e_helpers import cli
from transformers import AutoModelForCausalLM

from lm.corpus import load_sequences
from lm.loading import load_tokenizer
from stage2_student.evaluate import evaluate_models

pytestmark = pytest.mark.slow


def _held_out(tmp_path, tiny_corpus_dir):
    """Text the run never trained on: the chat corpus's assistant replies, as plain text."""
    path = tmp_path / "held.jsonl"
    rows = [json.loads(l) for l in (tiny_corpus_dir / "chat.jsonl").read_text().splitlines()]
    with open(path, "w") as f:
        for r in rows:
            text = " ".join(m["content"] for m in r["messages"] if isinstance(m.get("content"), str))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _common(tiny_run, held):
    return [
        "--run-dir",
        tiny_run,
        "--max-steps",
        4,
        "--batch-size",
        4,
        "--lr",
        3e-3,
        "--verify",
        "size",
        "--eval-data",
        f"held={held}",
        "--eval-every",
        2,
        "--eval-max-sequences",
        3,
    ]


def test_live_eval_equals_pipeline_eval_and_tensorboard_reads_back(tmp_path, tiny_run, tiny_model_dir, tiny_corpus_dir):
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra; pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    held = _held_out(tmp_path, tiny_corpus_dir)
    out = tmp_path / "s"
    cli("student", *_common(tiny_run, held), "--out", out, "--report-to", "tensorboard")
    m = _metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["step"] for r in m if "eval" in r] == [2, 4]
    final = m[-1]["eval"]["held"]

    # Reference 1: `pipeline eval`'s function on the saved model, base = the run's teacher, same sequences.
    ref = evaluate_models(
        {"m": str(out / "model")},
        str(tiny_model_dir),
        {"held": held},
        seq_len=32,
        batch_size=4,
        max_sequences=3,
        device="cpu",
        dtype="fp32",
    )["m"]["corpora"]["held"]
    assert final["tokens"] == ref["tokens"] > 0
    assert final["nll"] == pytest.approx(ref["nll"], rel=1e-6, abs=1e-6)
    assert final["kl"] == pytest.approx(ref["kl"], rel=1e-5, abs=1e-7)
    assert final["kl"] > 1e-4  # the student moved: the number can tell a wrong base from the right one

    # Reference 2: written out directly, on the whole eval set at once.
    tok = load_tokenizer(tiny_model_dir)
    seqs = load_sequences(held, tok, seq_len=32, max_samples=3).sequences
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    nll = kl = n = 0.0
    with torch.no_grad():
        for s in seqs:
            ids = torch.as_tensor(s.input_ids, dtype=torch.long)[None]
            mask = torch.as_tensor(s.label_mask, dtype=torch.bool)
            t = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].float(), -1)[mask]
            q = torch.log_softmax(student(input_ids=ids).logits[0, :-1].float(), -1)[mask]
            nll -= float(q.gather(1, ids[0, 1:][mask][:, None]).sum())
            kl += float((t.exp() * (t - q)).sum())
            n += int(mask.sum())
    assert final["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert final["kl"] == pytest.approx(kl / n, rel=1e-4)

    # The base's log-probs were computed once and cached under OUT/live_eval (positions x vocabulary fp32).
    (cache,) = (out / "live_eval").glob("held-*.npy")
    assert np.load(cache, mmap_mode="r").shape == (ref["tokens"], 384)

    # TensorBoard: the event files hold the metrics.jsonl numbers at their steps.
    # (accelerate's TensorBoard tracker writes the scalars in OUT/trackers/PROJECT, the hparams in a sub-folder)
    ea = EventAccumulator(str(out / "trackers" / "label-anneal"))
    ea.Reload()
    for key, field in (("train/ce", "ce"), ("train/kl", "kl"), ("train/lr", "lr")):
        got = {e.step: e.value for e in ea.Scalars(key)}
        assert got == pytest.approx({r["step"]: r[field] for r in m}, rel=1e-6), key
    for key, field in (("eval/held/nll", "nll"), ("eval/held/kl", "kl")):
        got = {e.step: e.value for e in ea.Scalars(key)}
        assert got == pytest.approx({r["step"]: r["eval"]["held"][field] for r in m if "eval" in r}, rel=1e-6)


def test_wandb_offline_run_holds_the_metrics(tmp_path, tiny_run, tiny_corpus_dir, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install wandb): the W&B tracker is not tested here")
    held = _held_out(tmp_path, tiny_corpus_dir)
    out = tmp_path / "w"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    cli("student", *_common(tiny_run, held), "--out", out, "--report-to", "wandb")
    m = _metrics(out)
    (log,) = list((out / "trackers" / "wandb").glob("offline-run-*/run-*.wandb"))
    history = {h["_step"]: h for h in _wandb_history(log)}
    assert sorted(history) == [1, 2, 3, 4]
    for r in m:
        assert history[r["step"]]["train/ce"] == pytest.approx(r["ce"], rel=1e-12)
        assert history[r["step"]]["train/kl"] == pytest.approx(r["kl"], rel=1e-12)
        if "eval" in r:
            assert history[r["step"]]["eval/held/kl"] == pytest.approx(r["eval"]["held"]["kl"], rel=1e-12)
    assert "eval/held/kl" not in history[1] and "eval/held/kl" in history[2]


def _wandb_history(path):
    """The history rows of a W&B offline transaction log (run-*.wandb): a 7-byte ':W&B' header, then records in the
    LevelDB log format (32 KiB blocks; each chunk: crc32c (4), length (2), type (1: full, 2: first, 3: middle,
    4: last)), each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's trailer too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = data
        elif kind in (3, 4):
            buf += data
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                yield {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}


@pytest.mark.parametrize(
    "args, named",
    [
        (["--eval-every", "2"], "--eval-every"),
        (["--eval-data", "held"], "--eval-data entry 'held'"),
        (["--eval-data", "held=/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
        (["--report-to", "tensorbored"], "--report-to 'tensorbored'"),
        (["--precision", "fp16"], "--precision='fp16'"),
    ],
)
def test_bad_eval_and_tracker_options_are_refused_before_work(tmp_path, tiny_run, args, named):
    r = cli("student", "--run-dir", tiny_run, "--out", tmp_path / "o", *args, expect_ok=False)
    assert r.exit_code == 2 and named in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_every_dtype_spelling_is_accepted(tmp_path, tiny_run):
    from stage2_student.config import EvalConfig, StudentConfig

    for spelling, canon in (("float32", "fp32"), ("fp32", "fp32"), ("bfloat16", "bf16"), ("BF16", "bf16")):
        assert StudentConfig(run_dir=tiny_run, out=tmp_path, precision=spelling).precision == canon
        EvalConfig(model="m", data=(f"x={tiny_run}",), dtype=spelling)


@pytest.mark.distributed
def test_two_processes_log_the_same_eval_as_one(tmp_path, tiny_run, tiny_corpus_dir):
    """Under DDP every process scores the eval sets (a collective forward under FSDP); the main one logs them and
    closes the trackers without tearing down the process group the run still uses."""
    import subprocess
    import sys

    from e2e_helpers import REPO

    held = _held_out(tmp_path, tiny_corpus_dir)
    args = [*map(str, _common(tiny_run, held)), "--report-to", "tensorboard"]
    cli("student", *args, "--batch-size", 4, "--out", tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [str(REPO / "pipeline.py"), "student", *args, "--batch-size", "2", "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two if "eval" in r] == [2, 4]
    for a, b in zip(one, two):
        if "eval" in a:
            assert b["eval"]["held"]["nll"] == pytest.approx(a["eval"]["held"]["nll"], rel=1e-4)
            assert b["eval"]["held"]["kl"] == pytest.approx(a["eval"]["held"]["kl"], rel=1e-3, abs=1e-7)
    assert list((tmp_path / "two" / "trackers" / "label-anneal").glob("events.out.tfevents.*"))


def test_eval_set_without_text_column_names_the_option(tmp_path, tiny_run, tiny_corpus_dir):
    chat = tiny_corpus_dir / "chat.jsonl"  # conversations in a `messages` column, no `text`
    r = cli("student", "--run-dir", tiny_run, "--out", tmp_path / "o", "--eval-data", f"c={chat}", expect_ok=False)
    assert r.exit_code == 1 and f"--eval-data c={chat}" in r.output and "'text'" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "o" / "model").exists()
