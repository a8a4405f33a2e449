"""Options a transformers / vLLM user expects (`--chat-template`, `--revision`, `--trust-remote-code`), and wording that
says what a run stores: the teacher's summary line counts scored tokens with the trained ones beside them, and
`pipeline inspect` names sampled draws as draws."""

from __future__ import annotations

import json
import re

import numpy as np
from e2e_helpers import cli
from transformers import AutoTokenizer

from storage import RunReader, load_manifest
from storage.spec import load_run_spec

TEMPLATE = (  # the tiny tokenizer's own is ChatML; this one uses other markers around the same special tokens
    "{% for m in messages %}<s>{{ m['role'] }}:\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:\n{% endif %}"
)


def _chat_teacher(tiny_model_dir, tiny_corpus_dir, out, *extra):
    return cli(
        "teacher",
        "--model",
        tiny_model_dir,
        "--data",
        tiny_corpus_dir / "chat.jsonl",
        "--messages-field",
        "messages",
        "--out",
        out,
        "--seq-len",
        64,
        "--capture",
        "topk",
        "--top-k",
        4,
        *extra,
    )


def test_chat_template_file_is_used_recorded_and_given_to_the_student(tmp_path, tiny_model_dir, tiny_corpus_dir):
    tpl = tmp_path / "tpl.jinja"
    tpl.write_text(TEMPLATE)
    _chat_teacher(tiny_model_dir, tiny_corpus_dir, tmp_path / "own")
    _chat_teacher(tiny_model_dir, tiny_corpus_dir, tmp_path / "custom", "--chat-template", tpl)
    spec = load_run_spec(tmp_path / "custom")
    assert spec.teacher["chat_template"] == TEMPLATE and spec.teacher["chat_template_file"] == str(tpl)
    assert "chat_template" not in load_run_spec(tmp_path / "own").teacher

    # The stored tokens are the conversations rendered by the file's template, not the tokenizer's own.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    first = json.loads((tiny_corpus_dir / "chat.jsonl").read_text().splitlines()[0])["messages"]
    rendered = tok(tok.apply_chat_template(first, tokenize=False, chat_template=TEMPLATE), add_special_tokens=False)
    rows = sorted(RunReader(tmp_path / "custom"), key=lambda r: r.sample_id)
    ids = rows[0].input_ids
    n = min(len(ids), len(rendered["input_ids"]))
    np.testing.assert_array_equal(ids[:n], rendered["input_ids"][:n])
    own = sorted(RunReader(tmp_path / "own"), key=lambda r: r.sample_id)[0].input_ids
    assert not np.array_equal(own[: min(len(own), n)], ids[: min(len(own), n)])

    # The student gets the run's template by default (its tokenizer fingerprint matches) and saves it with the model.
    common = ["--run-dir", tmp_path / "custom", "--max-steps", 1, "--batch-size", 2, "--verify", "size"]
    cli("student", *common, "--out", tmp_path / "s")
    assert AutoTokenizer.from_pretrained(tmp_path / "s" / "model").chat_template == TEMPLATE
    # Another template gives another tokenizer than the run's: refused, naming the field.
    other = tmp_path / "other.jinja"
    other.write_text(TEMPLATE.replace("}}:", "}} says:"))
    r = cli("student", *common, "--out", tmp_path / "s2", "--chat-template", other, expect_ok=False)
    assert r.exit_code == 1 and "tokenizer" in r.output and "Traceback" not in r.output


def test_model_option_misuse_is_refused_before_work(tmp_path, tiny_model_dir, tiny_corpus_dir):
    base = ["teacher", "--model", tiny_model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--out", tmp_path / "r"]
    r = cli(*base, "--chat-template", tmp_path / "t.jinja", expect_ok=False)
    assert r.exit_code == 2 and "--chat-template" in r.output and "--messages-field" in r.output
    r = cli(*base, "--revision", "main", expect_ok=False)
    assert r.exit_code == 1 and "--revision 'main'" in r.output and "local folder" in r.output
    r = cli(*base, "--trust-remote-code", "--engine", "vllm", expect_ok=False)
    assert r.exit_code == 2 and "--trust-remote-code" in r.output
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    r = cli(*base, "--messages-field", "messages", "--chat-template", empty, expect_ok=False)
    assert r.exit_code == 1 and "empty" in r.output and str(empty) in r.output
    assert not (tmp_path / "r").exists()


def test_trust_remote_code_reaches_the_loaders(tmp_path, tiny_model_dir, tiny_corpus_dir):
    # The tiny model is built into transformers, so trusting remote code changes nothing but must be accepted
    # end to end (teacher, student) and recorded in run.json.
    out = tmp_path / "r"
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
        "--trust-remote-code",
        "--capture",
        "topk",
        "--top-k",
        4,
    )
    assert load_run_spec(out).teacher["trust_remote_code"] is True
    cli("student", "--run-dir", out, "--out", tmp_path / "s", "--max-steps", 1, "--trust-remote-code")


def test_teacher_summary_counts_scored_tokens_with_trained_beside(tmp_path, tiny_model_dir, tiny_corpus_dir):
    out = tmp_path / "chat"
    line = _chat_teacher(tiny_model_dir, tiny_corpus_dir, out).output.strip().splitlines()[-1]
    m = load_manifest(out)
    scored = sum(r.tokens for r in m.shards)
    assert scored > m.trained_tokens  # prompts are scored, not trained
    found = re.search(r"([\d,]+) scored tokens at ([\d,]+) tok/s \(([\d,]+) trained, ([\d,]+) trained tok/s\)", line)
    assert found, line
    assert int(found[1].replace(",", "")) == scored and int(found[3].replace(",", "")) == m.trained_tokens
    assert int(found[2].replace(",", "")) >= int(found[4].replace(",", ""))


def test_inspect_names_sampled_draws_not_top_k(tmp_path, tiny_model_dir, tiny_corpus_dir):
    out = tmp_path / "s"
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
        "sample",
        "--draws",
        12,
    )
    table = cli("inspect", out).output
    assert "at most 12 distinct drawn ids with their draw counts (sampled, not a top-k)" in table
    assert not re.search(r"^k\s+12", table, re.M), table
    # and the help texts say what the default stores
    for args in (["--help"], ["teacher", "--help"]):
        assert "sampled draws" in " ".join(cli(*args).output.split()), args
