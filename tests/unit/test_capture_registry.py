"""storage.capture: the one registry of capture modes, checked against the behaviour it replaced."""

from __future__ import annotations

import pytest

from storage import MODES, CaptureMode, mode_of
from storage.capture import DRAWS_ALGORITHM
from storage.inspect_run import format_table, summarize
from storage.synthetic import synthetic_spec, write_synthetic_run

SETTINGS = {"top_k": 8, "top_p": 0.9, "min_k": 2, "draws": 16, "seed": 3}

# The capture dicts stage 1 records (stage1_teacher/run.py: prepare) and the lines the old
# storage.inspect_run._capture_text printed for them, written out by hand.
CAPTURES = {
    "topk": ({"mode": "topk", "engine": "hf", "dtype": "float32"}, "topk: the top k ids + the tail mass"),
    "topp": (
        {"mode": "topp", "engine": "hf", "dtype": "float32", "top_p": 0.9, "min_k": 2, "max_k": 8},
        "topp: smallest prefix holding 0.9 of the mass, 2..8 ids",
    ),
    "sample": (
        {
            "mode": "sample",
            "engine": "hf",
            "dtype": "float32",
            "draws": 16,
            "seed": 3,
            "head_k": 0,
            "draws_algorithm": DRAWS_ALGORITHM,
        },
        "sample: 16 draws per position from the full distribution (seed 3)",
    ),
    "hybrid": (
        {
            "mode": "hybrid",
            "engine": "hf",
            "dtype": "float32",
            "draws": 16,
            "seed": 3,
            "head_k": 8,
            "draws_algorithm": DRAWS_ALGORITHM,
        },
        "hybrid: exact top 8 + 16 tail draws (seed 3)",
    ),
}


def test_modes_in_fixed_order():
    assert list(MODES) == ["topk", "topp", "sample", "hybrid"]
    assert all(isinstance(m, CaptureMode) and m.name == name for name, m in MODES.items())
    assert all(m.help and "\n" not in m.help for m in MODES.values())


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_round_trips(name):
    assert mode_of({"mode": name, "engine": "hf", "dtype": "float32"}) is MODES[name]
    assert mode_of(CAPTURES[name][0]) is MODES[name]


def test_no_mode_is_topk():
    assert mode_of({}) is MODES["topk"]
    assert mode_of({"engine": "synthetic"}).describe({}) == "topk: the top k ids + the tail mass"


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match=r"'nucleus'.*topk, topp, sample, hybrid"):
        mode_of({"mode": "nucleus"})


@pytest.mark.parametrize("top_k,draws", [(1, 1), (8, 16), (32, 32), (64, 4)])
def test_stored_width_matches_the_old_table(top_k, draws):
    old = {"topk": top_k, "topp": top_k, "sample": draws, "hybrid": top_k + draws}
    assert {name: m.stored_width(top_k, draws) for name, m in MODES.items()} == old


@pytest.mark.parametrize("name", list(MODES))
def test_spec_fields_match_what_stage1_records(name):
    capture, _ = CAPTURES[name]
    expected = {k: v for k, v in capture.items() if k not in ("mode", "engine", "dtype")}
    assert MODES[name].spec_fields(**SETTINGS) == expected
    assert MODES[name].spec_fields(8, 0.9, 2, 16, 3) == expected


@pytest.mark.parametrize("name", list(MODES))
def test_describe_matches_the_old_text(name):
    capture, text = CAPTURES[name]
    assert mode_of(capture).describe(capture) == text


def test_flags_and_targets():
    # As stage 1 passes them to ShardWriter: variable = mode != "topk", sampled = mode in (sample, hybrid).
    assert {n: (m.variable, m.sampled) for n, m in MODES.items()} == {
        "topk": (False, False),
        "topp": (True, False),
        "sample": (True, True),
        "hybrid": (True, True),
    }
    assert {n: m.target for n, m in MODES.items()} == {
        "topk": "logprobs",
        "topp": "logprobs",
        "sample": "draw_counts",
        "hybrid": "head_and_draws",
    }


def test_inspect_table_wording(tmp_path):
    spec = synthetic_spec(num_shards=1, num_sequences=3)
    write_synthetic_run(tmp_path / "run", spec)
    info = summarize(tmp_path / "run")
    table = format_table(info)
    assert "capture           topk: the top k ids + the tail mass" in table
    assert "(mean teacher probability of the stored ids)" in table
    for name, (capture, text) in CAPTURES.items():
        table = format_table({**info, "capture": capture})
        assert f"capture           {text}\n" in table
        drawn = "(mean teacher probability of the stored ids: the distinct drawn tokens)" in table
        assert drawn == (name == "sample")
    # A mode this version does not know is still shown (as topk, as before), not an error.
    assert "topk: the top k ids" in format_table({**info, "capture": {"mode": "nucleus"}})
