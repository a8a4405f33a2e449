"""TeacherConfig: the scale-out options are range-checked and only valid together."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from stage1_teacher.config import TeacherConfig

BASE = {"model": "m", "data": "d.jsonl", "out": "runs/x"}


def test_ray_defaults_are_off():
    c = TeacherConfig(**BASE)
    assert (c.ray, c.ray_address, c.num_workers) == (False, None, 1)
    assert TeacherConfig(**BASE, ray=True, ray_address="auto", num_workers=8).num_workers == 8


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"num_workers": 0, "ray": True}, "num_workers=0: must be >= 1"),
        ({"num_workers": 4}, "num_workers=4 needs ray=True (--ray)"),
        ({"ray_address": "auto"}, "ray_address='auto' needs ray=True (--ray)"),
    ],
)
def test_invalid_scale_out_options_say_what_to_do(kw, message):
    with pytest.raises(ValueError) as e:
        TeacherConfig(**BASE, **kw)
    assert message in str(e.value)


def test_capture_auto_resolves_to_sample_on_every_engine():
    c = TeacherConfig(**BASE, capture="auto")
    assert c.resolved_capture("hf") == "sample"  # the hf engine sees the full distribution and can draw
    assert c.resolved_capture("vllm") == "sample"  # vLLM draws through its hidden-state route
    for mode in ("topk", "topp", "sample", "hybrid"):
        for engine in ("hf", "vllm"):
            assert TeacherConfig(**BASE, capture=mode, engine=engine).resolved_capture(engine) == mode
    with pytest.raises(ValueError, match="choose auto, topk, topp, sample or hybrid"):
        TeacherConfig(**BASE, capture="best")


# ------------------------------------------------------------------------------------------- mode options (#24 item 5)


@pytest.mark.parametrize(
    "kw, mode",
    [
        ({"top_k": 64}, "topk"),
        ({"top_k": 32}, "topk"),  # explicit, even at the default value
        ({"top_p": 0.9}, "topp"),
        ({"top_k": 64, "top_p": 0.9, "min_k": 2}, "topp"),
        ({"min_k": 2}, "topp"),
        ({"draws": 8}, "sample"),
    ],
)
def test_explicit_mode_option_under_auto_selects_its_mode(kw, mode):
    c = TeacherConfig(**BASE, **kw)
    assert c.capture == "auto" and c.explicit_capture() == mode
    assert c.resolved_capture("hf") == mode and c.resolved_capture("vllm") == mode
    assert c.mode_settings() == {"top_k": 32, "top_p": 0.99, "min_k": 4, "draws": 32, **kw}


def test_plain_auto_leaves_the_mode_options_unset():
    c = TeacherConfig(**BASE)
    assert c.explicit_capture() is None and (c.top_k, c.top_p, c.min_k, c.draws) == (None, None, None, None)
    assert c.mode_settings() == {"top_k": 32, "top_p": 0.99, "min_k": 4, "draws": 32}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"top_k": 8, "draws": 8}, "--top-k together with --draws under --capture auto"),
        ({"capture": "sample", "top_k": 64}, "--top-k has no effect with --capture sample"),
        ({"capture": "topk", "draws": 8}, "--draws has no effect with --capture topk"),
        (
            {"capture": "topk", "top_p": 0.5},
            "--top-p has no effect with --capture topk: drop it, or use --capture topp",
        ),
        ({"capture": "hybrid", "min_k": 2}, "--min-k has no effect with --capture hybrid"),
        ({"tensor_parallel_size": 2, "engine": "hf"}, "--tensor-parallel-size only apply to the vLLM engine"),
        (
            {"max_model_len": 4096, "gpu_memory_utilization": 0.5, "engine": "hf"},
            "--max-model-len / --gpu-memory-utilization only apply to the vLLM engine",
        ),
        ({"max_model_len": 64, "seq_len": 128, "engine": "vllm"}, "max_model_len=64 is below --seq-len 128"),
        ({"gpu_memory_utilization": 1.5, "engine": "vllm"}, "gpu_memory_utilization=1.5: must be in (0, 1]"),
        ({"tensor_parallel_size": 0, "engine": "vllm"}, "tensor_parallel_size=0: must be >= 1"),
        ({"top_p": 0.5, "top_k": 4, "min_k": 8}, "min_k=8: must be in 1..top_k (4)"),
    ],
)
def test_mode_options_the_mode_would_ignore_are_refused(kw, message):
    with pytest.raises(ValueError) as e:
        TeacherConfig(**BASE, **kw)
    assert message in str(e.value)


def test_explicit_top_k_under_auto_is_what_the_run_stores(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """`pipeline teacher --top-k 8` (default --capture auto, hf engine) stores the top 8, and inspect says so;
    an option the chosen mode ignores is refused through the CLI with one message, before any work."""
    from e2e_helpers import cli

    from storage import RunReader

    args = ["teacher", "--model", tiny_model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--seq-len", 32]
    cli(*args, "--engine", "hf", "--top-k", 8, "--max-samples", 4, "--out", tmp_path / "r")
    reader = RunReader(tmp_path / "r")
    assert reader.spec.capture["mode"] == "topk" and reader.spec.k == 8
    assert reader[0].sample_counts is None and reader[0].topk_ids.shape[1] == 8
    table = cli("inspect", tmp_path / "r").output
    assert "capture           topk: the top k ids + the tail mass" in table
    assert "per position      the top 8 ids with their log-probs, + the tail mass" in table
    r = cli(*args, "--capture", "sample", "--top-k", 64, "--out", tmp_path / "bad", expect_ok=False)
    assert r.exit_code != 0 and "--top-k has no effect with --capture sample" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "bad").exists()


def test_vllm_options_through_the_cli(tmp_path, tiny_model_dir, tiny_corpus_dir):
    """--tensor-parallel-size / --max-model-len / --gpu-memory-utilization are options of `pipeline teacher`,
    refused with one message and nothing written when the engine is hf (given, or chosen by --engine auto)."""
    from e2e_helpers import cli

    args = ["teacher", "--model", tiny_model_dir, "--data", tiny_corpus_dir / "text.jsonl", "--seq-len", 32]
    help_text = cli("teacher", "--help").output
    for opt in ("--tensor-parallel-size", "--max-model-len", "--gpu-memory-utilization"):
        assert opt in help_text
    r = cli(*args, "--engine", "hf", "--tensor-parallel-size", 2, "--out", tmp_path / "a", expect_ok=False)
    assert r.exit_code != 0 and "--tensor-parallel-size only apply to the vLLM engine" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "a").exists()
    if importlib.util.find_spec("vllm") is None and not torch.cuda.is_available():  # auto resolves to hf here
        r = cli(*args, "--max-model-len", 64, "--out", tmp_path / "b", expect_ok=False)
        assert r.exit_code != 0 and "--max-model-len only apply to the vLLM engine, and --engine auto chose hf" in (
            r.output
        )
        assert "Traceback" not in r.output and not (tmp_path / "b").exists()
