"""`pipeline teacher` end to end on the tiny model: values, chat masks, resume after SIGKILL, split work."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from e2e_helpers import assert_same_run, big_corpus, cli, spawn
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage import Encoding, RunReader
from storage.failpoints import ENV as FAILPOINTS_ENV
from storage.spec import RunSpec


def reference_topk(model, input_ids: np.ndarray, k: int):
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64))[None]).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1)
    top = lp.topk(k, -1)
    rest = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return top.indices.numpy(), top.values.numpy(), rest.numpy()


@pytest.mark.parametrize("encoding", ["exact", "compact"])
def test_text_run_matches_independent_log_softmax(tmp_path, tiny_model_dir, tiny_corpus_dir, encoding):
    out = tmp_path / "run"
    res = cli(
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
        16,
        "--seq-len",
        48,
        "--num-shards",
        3,
        "--batch-size",
        5,
        "--encoding",
        encoding,
    )
    assert "finalized" in res.output and "B/trained token" in res.output
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    bound = Encoding.parse(encoding).logprob_error_bound()
    reader = RunReader(out)
    rows = list(reader)
    # Each shard packs its own corpus range: ids i * 2**32 + j, and the shards' tokens in order are the
    # document stream of the whole corpus (each document's tokens + EOS), cut at every shard boundary.
    by_shard = {}
    for r in rows:
        by_shard.setdefault(r.sample_id >> 32, []).append(r.sample_id & 0xFFFFFFFF)
    assert sorted(by_shard) == [0, 1, 2] and all(v == list(range(len(v))) for v in by_shard.values())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [r["text"] for r in map(json.loads, (tiny_corpus_dir / "text.jsonl").read_text().splitlines())]
    stream = [t for x in texts if isinstance(x, str) and x.strip() for t in tok(x)["input_ids"] + [tok.eos_token_id]]
    np.testing.assert_array_equal(np.concatenate([r.input_ids for r in rows]), stream)
    for row in reader:
        ids, lp, tail = reference_topk(model, row.input_ids, 16)
        m = row.label_mask
        assert row.topk_ids.shape == (m.sum(), 16)
        if encoding == "exact":
            np.testing.assert_array_equal(row.topk_ids, ids[m])
            np.testing.assert_allclose(row.topk_logprobs, lp[m], atol=1e-5)
            np.testing.assert_allclose(row.tail_logprob, tail[m], atol=1e-5)
        else:
            for p, q in zip(np.flatnonzero(m), range(m.sum())):
                assert set(row.topk_ids[q]) == set(ids[p])
                got = dict(zip(row.topk_ids[q], row.topk_logprobs[q]))
                assert max(abs(got[i] - v) for i, v in zip(ids[p], lp[p])) <= bound + 1e-5
            np.testing.assert_allclose(row.tail_logprob, tail[m], rtol=2e-3)


def test_chat_run_trains_only_assistant_tokens(tmp_path, tiny_model_dir, tiny_corpus_dir):
    out = tmp_path / "chat"
    cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "chat.jsonl",
        "--out",
        out,
        "--messages-field",
        "messages",
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        64,
        "--encoding",
        "exact",
    )
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    rows = list(RunReader(out))
    assert any((~r.label_mask).any() for r in rows), "prompt positions must be untrained"
    assistant_tokens = set(tok("The sky is often blue.")["input_ids"])
    for row in rows:
        targets = row.input_ids[1:][row.label_mask]
        # Trained targets never include a user turn's opening marker.
        assert tok.convert_tokens_to_ids("<|im_start|>") not in targets
        ids, lp, _ = reference_topk(model, row.input_ids, 8)
        np.testing.assert_array_equal(row.topk_ids, ids[row.label_mask])
        np.testing.assert_allclose(row.topk_logprobs, lp[row.label_mask], atol=1e-5)
    assert assistant_tokens  # sanity: the tokenizer works


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_corpus_dir):
    data = big_corpus(tmp_path / "big.jsonl", tiny_corpus_dir, copies=12)
    args = [
        "--model",
        tiny_model_dir,
        "--data",
        data,
        "--capture",
        "topk",
        "--top-k",
        8,
        "--seq-len",
        64,
        "--num-shards",
        8,
        "--batch-size",
        1,
        "--encoding",
        "exact",
    ]
    cli("teacher", *args, "--out", tmp_path / "ref")

    out = tmp_path / "killed"
    # The process kills itself right after shard 1 is renamed into place (storage/failpoints.py).
    p = spawn("teacher", *args, "--out", out, env={FAILPOINTS_ENV: "shard.committed{shard=1}=kill"})
    log, _ = p.communicate()
    assert p.returncode == -signal.SIGKILL, log[-2000:]
    shard_dir = out / "shards"
    done = list(shard_dir.glob("*.parquet"))
    assert len(done) == 2 and not (out / "manifest.json").exists()
    before = {q.name: q.stat().st_mtime_ns for q in done}

    res = cli("teacher", *args, "--out", out)
    assert "finalized" in res.output
    after = {q.name: q.stat().st_mtime_ns for q in shard_dir.glob("*.parquet")}
    assert all(after[n] == t for n, t in before.items()), "finished shards are skipped, not rewritten"
    assert not list(shard_dir.glob("*.tmp")), "no leftovers"
    assert_same_run(out, tmp_path / "ref")


@pytest.mark.slow
def test_two_processes_split_the_work(tmp_path, tiny_model_dir, tiny_corpus_dir):
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
        "--num-shards",
        3,
    ]
    cli("teacher", *args, "--out", tmp_path / "one")
    out = tmp_path / "many"
    procs = [spawn("teacher", *args, "--out", out, "--shard-index", i) for i in (0, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stdout.read()
    assert not (out / "manifest.json").exists()
    r = cli("teacher", "--finalize", out, expect_ok=False)
    assert r.exit_code != 0 and "part-00001-of-00003" in r.output
    # The third "node" comes from the environment, as a SLURM array task would.
    p = spawn("teacher", *args, "--out", out, env={"SLURM_ARRAY_TASK_ID": "1"})
    assert p.wait(timeout=300) == 0, p.stdout.read()
    assert (out / "manifest.json").exists(), "the process that completes the run writes the manifest"
    cli("teacher", "--finalize", out)
    assert_same_run(out, tmp_path / "one")


def test_errors_are_specific(tmp_path, tiny_model_dir, tiny_corpus_dir):
    base = ["teacher", "--data", tiny_corpus_dir / "text.jsonl", "--capture", "topk", "--top-k", 4, "--seq-len", 32]
    r = cli(*base, "--model", tmp_path / "nope", "--out", tmp_path / "a", expect_ok=False)
    assert r.exit_code != 0 and "nope" in r.output and "no such directory" in r.output
    r = cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tmp_path / "missing.jsonl",
        "--out",
        tmp_path / "b",
        "--seq-len",
        32,
        expect_ok=False,
    )
    assert r.exit_code != 0 and "missing.jsonl" in r.output
    r = cli(*base, "--model", tiny_model_dir, "--out", tmp_path / "c", "--text-field", "body", expect_ok=False)
    assert r.exit_code != 0 and "'body'" in r.output and "--text-field" in r.output
    r = cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--out",
        tmp_path / "d",
        "--top-k",
        100000,
        "--seq-len",
        32,
        expect_ok=False,
    )
    assert r.exit_code != 0 and "larger than the teacher's vocabulary (384)" in r.output
    r = cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--out",
        tmp_path / "g",
        "--seq-len",
        4096,
        expect_ok=False,
    )
    assert r.exit_code != 0 and "exceeds the teacher's context (512 positions)" in r.output
    r = cli(*base, "--model", tiny_model_dir, "--out", tmp_path / "e", "--top-k", 0, expect_ok=False)
    assert r.exit_code != 0 and "--top-k 0" in r.output and "Traceback" not in r.output
    r = cli("teacher", "--out", tmp_path / "f", expect_ok=False)
    assert r.exit_code != 0 and "--model" in r.output and "--data" in r.output


def test_run_dir_of_another_teacher_is_refused(tmp_path, tiny_model_dir, tiny_corpus_dir):
    from tiny_models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    args = [
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--capture",
        "topk",
        "--top-k",
        4,
        "--seq-len",
        32,
        "--out",
        tmp_path / "run",
    ]
    cli("teacher", "--model", tiny_model_dir, *args)
    r = cli("teacher", "--model", other, *args, expect_ok=False)
    assert r.exit_code != 0 and "different settings" in r.output and "teacher.weights_sha256" in r.output
    r = cli("teacher", "--model", tiny_model_dir, *args[:-2], "--out", tmp_path / "run", "--top-k", 8, expect_ok=False)
    assert "k: 4 vs 8" in r.output


def test_run_drawn_by_the_previous_draw_algorithm_is_not_resumed_into(tmp_path, tiny_model_dir, tiny_corpus_dir):
    # Runs written before capture.draws_algorithm existed drew by a full-vocabulary fp64 cumsum: the same
    # uniforms may give other ids, so adding shards to such a run would mix two algorithms.
    args = ["--model", tiny_model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--seq-len", 32]
    args += ["--capture", "sample", "--draws", 8, "--num-shards", 2, "--shard-index", 0, "--out", tmp_path / "run"]
    cli("teacher", *args)
    spec_path = tmp_path / "run" / "run.json"
    spec = json.loads(spec_path.read_text())
    assert spec["capture"]["draws_algorithm"] == "blocked-inverse-cdf-1"
    del spec["capture"]["draws_algorithm"]
    old = RunSpec.from_dict({k: v for k, v in spec.items() if k != "fingerprint"})
    spec_path.write_text(json.dumps(old.to_dict()))  # as the previous version wrote it
    args[-3] = 1  # the other shard
    r = cli("teacher", *args, expect_ok=False)
    assert r.exit_code != 0 and "different settings" in r.output
    assert "capture.draws_algorithm: None vs 'blocked-inverse-cdf-1'" in r.output and "Traceback" not in r.output


def test_config_file_and_inspect(tmp_path, tiny_model_dir, tiny_corpus_dir):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'model = "{tiny_model_dir}"\ndata = "{tiny_corpus_dir / "text.jsonl"}"\n'
        f'capture = "topk"\ntop-k = 4\nseq_len = 32\nout = "{tmp_path / "run"}"\n'
    )
    cli("teacher", "--config", cfg, "--top-k", 6)  # the flag wins over the file
    info = json.loads(cli("inspect", tmp_path / "run", "--json").output)
    assert info["k"] == 6 and info["rows"] > 0 and info["trained_tokens"] > 0
    assert 0 < info["mean_topk_mass"] < 1 and info["bytes_per_trained_token"] > 0
    assert info["capture"]["mode"] == "topk"
    table = cli("inspect", tmp_path / "run").output
    assert "B / trained token" in table and "part-00000-of-00001.parquet" in table
    assert "capture           topk: the top k ids + the tail mass" in table
    cfg.write_text('modle = "x"\n')
    r = cli("teacher", "--config", cfg, expect_ok=False)
    assert r.exit_code != 0 and "unknown key(s) ['modle']" in r.output


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("topp", ["--top-k", 32, "--top-p", 0.5, "--min-k", 2]),
        ("sample", ["--draws", 16]),
        ("sample", ["--draws", 16, "--store-draw-logprobs"]),
        ("hybrid", ["--top-k", 4, "--draws", 8]),
        ("auto", ["--draws", 16, "--engine", "hf"]),
    ],
)
def test_capture_modes_end_to_end(tmp_path, tiny_model_dir, tiny_corpus_dir, mode, extra):
    out = tmp_path / mode
    cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "text.jsonl",
        "--out",
        out,
        "--seq-len",
        32,
        "--capture",
        mode,
        *extra,
    )
    reader = RunReader(out)
    # auto with the hf engine: the sampled labels (the manifest records the resolved mode, not "auto")
    mode = "sample" if mode == "auto" else mode
    assert reader.spec.capture["mode"] == mode
    assert f"capture           {mode}:" in cli("inspect", out).output
    keep_draw_lp = "--store-draw-logprobs" in extra
    if mode in ("sample", "hybrid"):  # the counts layout is the sampled modes' default (issue 20)
        assert reader.spec.encoding["sampled_layout"] == "counts"
        assert reader.spec.encoding.get("draw_logprobs", False) == keep_draw_lp
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    row = reader[0]
    ids, lp, _ = reference_topk(model, row.input_ids, 384)
    full = {}
    for p in range(len(ids)):
        full[p] = dict(zip(ids[p], lp[p]))
    for q, p in enumerate(np.flatnonzero(row.label_mask)):
        valid = row.topk_ids[q] >= 0
        assert valid.any()
        # Every stored log-prob is the teacher's own (within the q8 bound); the drawn ids of a sampled run carry
        # none (NaN) unless --store-draw-logprobs kept them.
        drawn = valid & (row.sample_counts[q] > 0) if row.sample_counts is not None else np.zeros_like(valid)
        assert np.isnan(row.topk_logprobs[q][drawn]).all() != keep_draw_lp or not drawn.any()
        kept = valid & ~np.isnan(row.topk_logprobs[q])
        assert kept.sum() == (valid.sum() if keep_draw_lp or mode == "topp" else (valid & ~drawn).sum())
        for i, v in zip(row.topk_ids[q][kept], row.topk_logprobs[q][kept]):
            assert abs(full[p][i] - v) <= Encoding().logprob_error_bound() + 1e-4
        if mode == "sample":
            assert row.sample_counts[q].sum() == 16
        if mode == "hybrid":
            assert (row.sample_counts[q][:4] == 0).all() and row.sample_counts[q][4:].sum() == 8
    cli(
        "student",
        "--run-dir",
        out,
        "--out",
        tmp_path / f"s_{mode}",
        "--max-steps",
        2,
        "--batch-size",
        2,
        "--verify",
        "size",
    )
    m = [json.loads(l) for l in (tmp_path / f"s_{mode}" / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 2 and all(np.isfinite([r["ce"], r["kl"], r["total"]]).all() for r in m)


def test_more_shards_than_documents_and_the_model_found_from_anywhere(tmp_path, tiny_model_dir, monkeypatch):
    """A range that holds no document gives an empty shard (the run still finalizes and trains), and a model
    given by a relative path is recorded absolute: stage 2, launched from elsewhere, finds it as its student."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello world", "rain fell", "a student"]))
    monkeypatch.chdir(tiny_model_dir.parent)
    cli(
        "teacher",
        *("--model", tiny_model_dir.name, "--data", data, "--out", tmp_path / "run"),
        *("--num-shards", 8, "--seq-len", 16, "--capture", "topk", "--top-k", 4),
    )
    spec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert spec["teacher"]["name_or_path"] == str(tiny_model_dir.resolve()) and spec["format_version"] == 2
    rows = [s["rows"] for s in json.loads((tmp_path / "run" / "manifest.json").read_text())["shards"]]
    assert sum(rows) == 3 and rows.count(0) == 5
    monkeypatch.chdir(tmp_path)
    res = cli("student", "--run-dir", "run", "--out", "s", "--max-steps", 1, "--batch-size", 1)
    assert (tmp_path / "s" / "model" / "config.json").exists(), res.output


def test_a_hub_model_is_recorded_with_its_revision(tmp_path):
    from stage1_teacher.prepare import model_record

    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert model_record("org/tiny", snap) == {"name_or_path": "org/tiny", "revision": "0123abcd"}
    assert model_record(str(snap), snap) == {"name_or_path": str(snap.resolve())}
