"""`lm.lm_head.load_output_head`: the lm_head read from a checkpoint alone (what the vLLM engine's hidden-state route
applies) equals the loaded model's own head, for an untied head, a tied one and a sharded checkpoint; and a head
applied to the model's final hidden states reproduces its logits."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build_tiny_model
from transformers import AutoModelForCausalLM

from lm.lm_head import apply_logit_transforms, load_output_head


def _tie(model_dir) -> None:
    """Re-save the tiny model with tied embeddings: the checkpoint then has no lm_head.weight."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(model_dir, safe_serialization=True)


@pytest.mark.parametrize("layout", ["untied", "tied", "sharded"])
def test_head_from_checkpoint_equals_model_head(tmp_path, layout):
    path = build_tiny_model(tmp_path / "m", seed=1)
    if layout == "tied":
        _tie(path)
    if layout == "sharded":
        model = AutoModelForCausalLM.from_pretrained(path)
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
        assert json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    weight, bias, config = load_output_head(path, torch.float32, "cpu")
    torch.testing.assert_close(weight, model.get_output_embeddings().weight, rtol=0, atol=0)
    assert bias is None and config.vocab_size == weight.shape[0]
    x = torch.arange(1, 20)[None]
    with torch.inference_mode():
        hidden = model.base_model(input_ids=x).last_hidden_state[0]
        ref = model(input_ids=x).logits[0]
    got = apply_logit_transforms(torch.nn.functional.linear(hidden, weight, bias), config)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    path = build_tiny_model(tmp_path / "m", seed=1)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_output_head(path, torch.float32, "cpu")
