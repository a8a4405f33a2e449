"""`pipeline eval --convention lm-eval` and bits per byte: against hand computations on the tiny model, and against
lm-evaluation-harness's own loglikelihood_rolling where lm_eval is installed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from e2e_helpers import cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from stage2_student.evaluate import evaluate_models, rolling_windows

DOCS = [
    "Rain fell on the old stone bridge.",
    "The river carried leaves to the sea, and the sea kept them. " * 6,  # longer than the window: several windows
    "é à ü: bytes are not characters.",
]


@pytest.fixture()
def docs_jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return p


@pytest.mark.parametrize("n, max_len", [(1, 4), (4, 4), (5, 4), (9, 4), (13, 5), (3, 1)])
def test_rolling_windows_score_every_token_once_in_order(n, max_len):
    toks = list(range(100, 100 + n))
    windows = rolling_windows(toks, 7, max_len)
    targets = [t for ids, mask in windows for t, m in zip(ids[1:], mask) if m]
    assert targets == toks
    assert windows[0][0][0] == 7  # the prefix token, never a target
    for ids, mask in windows:
        assert len(mask) == len(ids) - 1 <= max_len  # at most max_len ids run through the model
    for ids, _mask in windows[1:]:
        assert len(ids) == max_len + 1  # later windows have the full context


def _reference(model_dir, texts, max_len):
    """Σ NLL and tokens under the lm-eval convention, one window at a time, written out: each token's context is
    the window's inputs before it."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            toks = tok(text, add_special_tokens=False)["input_ids"]
            for ids, mask in rolling_windows(toks, tok.bos_token_id, max_len):
                ids_t = torch.tensor(ids)[None]
                lp = torch.log_softmax(model(ids_t[:, :-1]).logits[0].double(), -1)
                for j, m in enumerate(mask):
                    if m:
                        nll -= lp[j, ids[j + 1]].item()
                        n += 1
    return nll, n


def test_lm_eval_convention_and_bits_per_byte_match_hand_computation(tiny_model_dir, docs_jsonl):
    res = evaluate_models(
        {"m": str(tiny_model_dir)},
        None,
        {"d": docs_jsonl},
        seq_len=16,
        batch_size=3,
        device="cpu",
        convention="lm-eval",
    )["m"]["corpora"]["d"]
    nll, n = _reference(tiny_model_dir, DOCS, 16)
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    assert res["tokens"] == n and res["bytes"] == n_bytes > sum(len(d) for d in DOCS)  # é, à, ü: 2 bytes each
    assert res["nll"] == pytest.approx(nll / n, rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-6)


def test_packed_and_lm_eval_conventions_score_different_tokens(tiny_model_dir, docs_jsonl):
    kw = dict(seq_len=16, batch_size=3, device="cpu")
    packed = evaluate_models({"m": str(tiny_model_dir)}, None, {"d": docs_jsonl}, **kw)["m"]["corpora"]["d"]
    lm = evaluate_models({"m": str(tiny_model_dir)}, None, {"d": docs_jsonl}, convention="lm-eval", **kw)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    n_doc = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)
    assert lm["m"]["corpora"]["d"]["tokens"] == n_doc
    assert packed["tokens"] != n_doc  # EOS scored, each sequence's first token not: another token count
    assert packed["bits_per_byte"] > 0


def test_matches_lm_eval_loglikelihood_rolling(tiny_model_dir, docs_jsonl):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm_eval)")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = HFLM(pretrained=model, tokenizer=tok, max_length=16, batch_size=1, device="cpu")
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    ll = sum(lm.loglikelihood_rolling(reqs, disable_tqdm=True))
    ours = evaluate_models(
        {"m": str(tiny_model_dir)},
        None,
        {"d": docs_jsonl},
        seq_len=16,
        batch_size=3,
        device="cpu",
        convention="lm-eval",
    )["m"]["corpora"]["d"]
    assert ours["nll"] * ours["tokens"] == pytest.approx(-ll, abs=1e-4 * ours["tokens"])


def test_lm_eval_tasks_alone_need_no_data(tiny_model_dir):
    r = cli("eval", "--model", tiny_model_dir, "--lm-eval-tasks", "no_such_task", expect_ok=False)
    assert "--data" not in r.output and "at least one corpus" not in r.output, r.output
    assert "lm_eval" in r.output or "unknown lm-eval task" in r.output
    assert "Traceback" not in r.output


def test_bad_convention_is_refused(tiny_model_dir, docs_jsonl):
    r = cli("eval", "--model", tiny_model_dir, "--data", f"d={docs_jsonl}", "--convention", "hf", expect_ok=False)
    assert r.exit_code == 2 and "--convention 'hf'" in r.output
