"""`stage2_student.merge` and `pipeline merge`: exact endpoints, interpolation, extrapolation, refusals."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from e2e_helpers import cli
from safetensors.torch import load_file
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from stage2_student.merge import MergeConfig, merge_models


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(model_dir) / "model.safetensors")


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory) -> Path:
    """Stands in for a fine-tune of tiny_model_dir: same architecture and tokenizer, other weights."""
    return build_tiny_model(tmp_path_factory.mktemp("tuned"), seed=1)


@pytest.fixture(scope="module")
def weights(tiny_model_dir, tuned_dir):
    return _weights(tiny_model_dir), _weights(tuned_dir)


def test_alpha_0_is_base_and_1_is_tuned_bit_exact(tiny_model_dir, tuned_dir, weights, tmp_path):
    base_w, tuned_w = weights
    for alpha, want in ((0.0, base_w), (1.0, tuned_w)):
        merge_models(tiny_model_dir, tuned_dir, alpha, tmp_path / f"a{alpha}")
        got = _weights(tmp_path / f"a{alpha}")
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("alpha", [0.5, 1.5])
def test_interpolation_and_extrapolation(tiny_model_dir, tuned_dir, weights, tmp_path, alpha):
    base_w, tuned_w = weights
    summary = merge_models(tiny_model_dir, tuned_dir, alpha, tmp_path / "m")
    got = _weights(tmp_path / "m")
    for k in base_w:
        b, t = base_w[k].double(), tuned_w[k].double()
        want = (b + t) / 2 if alpha == 0.5 else b + 1.5 * (t - b)
        torch.testing.assert_close(got[k].double(), want, rtol=0, atol=1e-6)
    assert summary["tensors"] == len(base_w) and summary["dtype"] == "float32"
    # The result is a normal HF checkpoint: it loads and runs.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model(torch.tensor([tok("hello there")["input_ids"]])).logits.isfinite().all()


def test_tied_embeddings_stay_tied(tmp_path):
    dirs = []
    for seed in (0, 1):
        d = build_tiny_model(tmp_path / f"src{seed}", seed=seed)
        m = LlamaForCausalLM.from_pretrained(d)
        m.config.tie_word_embeddings = True
        m.tie_weights()
        m.save_pretrained(d)
        dirs.append(d)
    merge_models(dirs[0], dirs[1], 0.5, tmp_path / "m")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    b = LlamaForCausalLM.from_pretrained(dirs[0]).model.embed_tokens.weight
    t = LlamaForCausalLM.from_pretrained(dirs[1]).model.embed_tokens.weight
    torch.testing.assert_close(merged.model.embed_tokens.weight, (b + t) / 2, rtol=0, atol=1e-6)


def test_saved_in_the_tuned_dtype(tiny_model_dir, tuned_dir, tmp_path):
    bf16 = tmp_path / "tuned_bf16"
    shutil.copytree(tuned_dir, bf16)
    LlamaForCausalLM.from_pretrained(tuned_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    want = _weights(bf16)
    merge_models(tiny_model_dir, bf16, 1.0, tmp_path / "m1")
    got = _weights(tmp_path / "m1")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    summary = merge_models(tiny_model_dir, bf16, 0.5, tmp_path / "m05")
    assert summary["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in _weights(tmp_path / "m05").values())


def test_alpha_validation(tiny_model_dir, tuned_dir, tmp_path, caplog):
    with pytest.raises(ValueError, match="alpha=-0.1: must be >= 0"):
        MergeConfig(base=str(tiny_model_dir), tuned=str(tuned_dir), alpha=-0.1, out=tmp_path / "x")
    with pytest.raises(ValueError, match="finite"):
        MergeConfig(base=str(tiny_model_dir), tuned=str(tuned_dir), alpha=float("nan"), out=tmp_path / "x")
    with caplog.at_level(logging.WARNING, logger="stage2_student.merge"):
        merge_models(tiny_model_dir, tuned_dir, 4.0, tmp_path / "far")
    assert "alpha=4 extrapolates" in caplog.text


def test_mismatched_architecture_is_refused(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other")
    m = LlamaForCausalLM.from_pretrained(other)
    cfg = m.config
    cfg.num_hidden_layers, cfg.intermediate_size = 1, 96
    LlamaForCausalLM(cfg).save_pretrained(other)
    with pytest.raises(ValueError) as e:
        merge_models(tiny_model_dir, other, 0.5, tmp_path / "m")
    msg = str(e.value)
    assert "only in the base" in msg and "model.layers.1." in msg
    assert "shape mismatch" in msg and "model.layers.0.mlp.down_proj.weight: base (64, 128) vs tuned (64, 96)" in msg
    assert not (tmp_path / "m").exists()


def test_different_tokenizer_is_refused(tiny_model_dir, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=1)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_models(tiny_model_dir, other, 0.5, tmp_path / "m")


def test_out_must_not_be_an_input(tiny_model_dir, tuned_dir):
    with pytest.raises(ValueError, match="is the tuned model's folder"):
        merge_models(tiny_model_dir, tuned_dir, 0.5, tuned_dir)


def test_cli(tiny_model_dir, tuned_dir, weights, tmp_path):
    r = cli("merge", "--base", tiny_model_dir, "--tuned", tuned_dir, "--alpha", 0.25, "--out", tmp_path / "m")
    assert "alpha=0.25 (WiSE-FT interpolation)" in r.output
    base_w, tuned_w = weights
    got = _weights(tmp_path / "m")
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(got[k], 0.75 * base_w[k] + 0.25 * tuned_w[k], rtol=0, atol=1e-6)
    r = cli(
        "merge", "--base", tiny_model_dir, "--tuned", tuned_dir, "--alpha", -1, "--out", tmp_path / "n", expect_ok=False
    )
    assert r.exit_code == 2 and "must be >= 0" in r.output
