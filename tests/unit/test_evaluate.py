"""`stage2_student.evaluate` and `pipeline eval` on the tiny model: NLL and KL against hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from e2e_helpers import cli
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm.corpus import load_sequences
from stage2_student.evaluate import EvalConfig, evaluate_models, run

SEQ_LEN = 32
MAX_SEQ = 5  # two batches of 4 and 1: the ragged last batch is covered
OPTS = dict(seq_len=SEQ_LEN, max_sequences=MAX_SEQ, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model_seed1"), seed=1)


@pytest.fixture(scope="module")
def text_corpus(tiny_corpus_dir) -> Path:
    return tiny_corpus_dir / "text.jsonl"


@pytest.fixture(scope="module")
def with_base(tiny_model_dir, other_model_dir, text_corpus) -> dict:
    """Two models against the tiny base; the second reads the base's log-probs from the cache."""
    models = {"other": str(other_model_dir), "same": str(tiny_model_dir)}
    return evaluate_models(models, str(tiny_model_dir), {"t": text_corpus}, **OPTS)


@pytest.fixture(scope="module")
def prose_txt(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prose") / "prose.txt"
    p.write_text("Rain fell on the old stone bridge. The river carried leaves to the sea.\n" * 8)
    return p


def _reference(model_dir, base_dir, corpus) -> tuple[float, float | None, int]:
    """Mean NLL, mean KL(base‖model) and trained positions, one unbatched sequence at a time."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = load_sequences(corpus, tok, seq_len=SEQ_LEN, max_samples=MAX_SEQ).sequences
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval() if base_dir else None
    nll, kl, n = 0.0, 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.as_tensor(s.input_ids, dtype=torch.long)[None]
            mask = torch.as_tensor(s.label_mask)
            lp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)[mask]  # (N, V)
            labels = ids[0, 1:][mask]
            nll -= lp.gather(1, labels[:, None]).sum().item()
            if base is not None:
                t = torch.log_softmax(base(ids).logits[0, :-1].double(), -1)[mask]
                kl += (t.exp() * (t - lp)).sum().item()
            n += int(mask.sum())
    return nll / n, (kl / n if base else None), n


def test_nll_matches_hand_computation(tiny_model_dir, text_corpus):
    res = evaluate_models({"m": str(tiny_model_dir)}, None, {"t": text_corpus}, **OPTS)
    m = res["m"]["corpora"]["t"]
    nll, _, n = _reference(tiny_model_dir, None, text_corpus)
    assert m["tokens"] == n
    assert m["nll"] == pytest.approx(nll, rel=1e-5)
    assert m["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert m["kl"] is None
    assert res["m"]["lm_eval"] is None


def test_kl_to_itself_is_zero(with_base):
    assert abs(with_base["same"]["corpora"]["t"]["kl"]) < 1e-6


def test_kl_of_another_model_matches_hand_computation(tiny_model_dir, other_model_dir, text_corpus, with_base):
    nll, kl, _ = _reference(other_model_dir, tiny_model_dir, text_corpus)
    got = with_base["other"]["corpora"]["t"]
    assert got["kl"] > 0.01
    assert got["kl"] == pytest.approx(kl, rel=1e-5)
    assert got["nll"] == pytest.approx(nll, rel=1e-5)


def test_base_cache_gives_the_same_numbers(tiny_model_dir, other_model_dir, text_corpus, with_base):
    models = {"other": str(other_model_dir), "same": str(tiny_model_dir)}
    recomputed = evaluate_models(models, str(tiny_model_dir), {"t": text_corpus}, base_cache_gb=0, **OPTS)
    assert recomputed == with_base


def test_different_tokenizer_is_refused(tmp_path, tiny_model_dir, text_corpus):
    odd = build_tiny_model(tmp_path / "odd")
    tok = AutoTokenizer.from_pretrained(odd)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(odd)
    with pytest.raises(ValueError, match="do not share one tokenizer"):
        evaluate_models({"odd": str(odd)}, str(tiny_model_dir), {"t": text_corpus}, **OPTS)


def test_bad_data_entries_are_all_named(tiny_model_dir, text_corpus, tmp_path):
    with pytest.raises(ValueError) as e:
        EvalConfig(
            model=str(tiny_model_dir),
            data=("noequals", f"a={text_corpus}", f"a={text_corpus}", f"b={tmp_path / 'missing.jsonl'}", "=x"),
        )
    msg = str(e.value)
    assert "'noequals': expected NAME=PATH" in msg
    assert "the name 'a' is used twice" in msg
    assert "missing.jsonl does not exist" in msg
    assert "'=x': both NAME and PATH must be non-empty" in msg
    with pytest.raises(ValueError, match="at least one corpus"):
        EvalConfig(model=str(tiny_model_dir), data=())
    cfg = EvalConfig(model=str(tiny_model_dir), data=[f"t = {text_corpus}"])
    assert cfg.corpora == {"t": text_corpus}


def test_cli_bad_data_is_a_usage_error(tiny_model_dir):
    r = cli("eval", "--model", tiny_model_dir, "--data", "nonsense", expect_ok=False)
    assert r.exit_code == 2 and "expected NAME=PATH" in r.output
    r = cli("eval", "--model", tiny_model_dir, expect_ok=False)
    assert r.exit_code == 2 and "at least one corpus" in r.output


def test_cli_prints_table_and_writes_json(tiny_model_dir, other_model_dir, text_corpus, prose_txt, tmp_path):
    out = tmp_path / "res" / "eval.json"
    r = cli(
        "eval",
        "--model",
        other_model_dir,
        "--base",
        tiny_model_dir,
        "--data",
        f"target={text_corpus}",
        "--data",
        f"retention={prose_txt}",
        "--seq-len",
        SEQ_LEN,
        "--max-sequences",
        MAX_SEQ,
        "--device",
        "cpu",
        "--json-out",
        out,
    )
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["model", str(other_model_dir)] and lines[1].split() == ["base", str(tiny_model_dir)]
    header = next(i for i, l in enumerate(lines) if l.split() == ["corpus", "tokens", "nll", "ppl", "bits/byte", "kl"])
    assert [l.split()[0] for l in lines[header + 1 :]] == ["target", "retention"]
    saved = json.loads(out.read_text())
    assert saved["model"] == str(other_model_dir) and saved["base"] == str(tiny_model_dir)
    assert set(saved["corpora"]) == {"target", "retention"}
    for name, m in saved["corpora"].items():
        assert m["kl"] > 0 and m["tokens"] > 0 and m["ppl"] == pytest.approx(math.exp(m["nll"]))
        row = next(l for l in lines if l.startswith(name)).split()
        assert float(row[2]) == pytest.approx(m["nll"], abs=1e-4) and float(row[5]) == pytest.approx(m["kl"], abs=1e-6)
        assert float(row[4]) == pytest.approx(m["bits_per_byte"], abs=1e-4)
    assert saved["config"]["data"] == [f"target={text_corpus}", f"retention={prose_txt}"]


def test_cli_json_and_config_file(tiny_model_dir, text_corpus, tmp_path):
    toml = tmp_path / "eval.toml"
    toml.write_text(
        f'model = "{tiny_model_dir}"\ndata = ["t={text_corpus}"]\nseq-len = {SEQ_LEN}\n'
        f'max_sequences = {MAX_SEQ}\ndevice = "cpu"\n'
    )
    printed = json.loads(cli("eval", "--config", toml, "--json", "--batch-size", 2).stdout)
    assert printed["base"] is None and printed["corpora"]["t"]["kl"] is None
    assert printed["config"]["seq_len"] == SEQ_LEN and printed["config"]["batch_size"] == 2
    nll, _, n = _reference(tiny_model_dir, None, text_corpus)
    assert printed["corpora"]["t"]["tokens"] == n and printed["corpora"]["t"]["nll"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.slow
def test_lm_eval_local_task_offline(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"question": "What is two plus two?", "choices": ["four", "seven"], "answer": 0},
                {"question": "Name a color of the sky.", "choices": ["green", "blue"], "answer": 1},
                {"question": "How many legs does a spider have?", "choices": ["eight", "three"], "answer": 0},
            ]
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_qa.yaml").write_text(
        "task: tiny_qa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    res = run(
        EvalConfig(
            model=str(tiny_model_dir),
            data=(f"qa={data}",),
            text_field="question",
            seq_len=SEQ_LEN,
            device="cpu",
            lm_eval_tasks="tiny_qa",
            lm_eval_include=tasks,
        )
    )
    acc = res["lm_eval"]["tiny_qa"]["acc,none"]
    assert 0.0 <= acc <= 1.0
