"""TeacherConfig: the scale-out options are range-checked and only valid together."""

from __future__ import annotations

import pytest

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


def test_capture_auto_resolves_by_what_the_engine_can_do():
    c = TeacherConfig(**BASE, capture="auto")
    assert c.resolved_capture("hf") == "sample"  # the hf engine sees the full distribution and can draw
    assert c.resolved_capture("vllm") == "topk"  # vLLM returns only the top log-probs
    for mode in ("topk", "topp", "sample", "hybrid"):
        assert (
            TeacherConfig(**BASE, capture=mode).resolved_capture("vllm" if mode in ("topk", "topp") else "hf") == mode
        )
    with pytest.raises(ValueError, match="choose auto, topk, topp, sample or hybrid"):
        TeacherConfig(**BASE, capture="best")
