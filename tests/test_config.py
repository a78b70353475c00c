"""HyperConfig, the op's settings (OpSettings), HYPER_* environment parsing and LayerSelection."""

from __future__ import annotations

import dataclasses
import os

import pytest

from hyper_backend import HyperConfig
from hyper_backend.config import (
    DEFAULTS,
    MIN_SEQ_LEN,
    SAMPLE_SIZE,
    EnvError,
    LayerSelection,
    OpSettings,
    default_tune_cache,
    op_settings,
    read_env,
    resolve,
)

# ----------------------------------------------------------------------------------------------------------
# HyperConfig
# ----------------------------------------------------------------------------------------------------------


def test_defaults_match_the_issue():
    c = HyperConfig()
    assert (c.block_size, c.sample_size, c.lsh_num_projs, c.min_seq_len, c.causal_depth, c.seed) == (
        256,
        None,
        7,
        None,
        None,
        0,
    )
    assert (c.detector, c.top_k, c.draws) == ("topk", 2048, SAMPLE_SIZE["topk"]) and SAMPLE_SIZE["topk"] == 1024


def test_sample_size_defaults_per_detector():
    """``sample_size=None`` is each detector's own number of draws (``"lsh"``: 256, as in earlier releases), also
    after a `replace` of the detector; an explicit value is kept whatever the detector."""
    assert HyperConfig(detector="lsh").draws == SAMPLE_SIZE["lsh"] == 256
    assert HyperConfig().replace(detector="lsh").draws == 256
    assert HyperConfig(sample_size=64).replace(detector="lsh").draws == 64
    assert resolve({"detector": "lsh"}).draws == 256 and "m=256" in HyperConfig(detector="lsh").label()
    assert "k=2048" in HyperConfig().label() and "m=1024" in HyperConfig().label()


def test_min_seq_len_defaults_per_detector():
    """``min_seq_len=None`` is each detector's own threshold, also after a `replace` of the detector; an explicit
    value is kept whatever the detector."""
    assert HyperConfig().min_len == MIN_SEQ_LEN["topk"] and MIN_SEQ_LEN["topk"] > MIN_SEQ_LEN["lsh"]
    assert HyperConfig(detector="lsh").min_len == MIN_SEQ_LEN["lsh"] == 4096
    assert HyperConfig().replace(detector="lsh").min_len == 4096
    assert HyperConfig(min_seq_len=1000).replace(detector="lsh").min_len == 1000
    assert resolve({"detector": "lsh"}).min_len == 4096


def test_frozen_and_hashable():
    c = HyperConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block_size = 128
    assert hash(c) == hash(HyperConfig())
    assert c == HyperConfig() and c != HyperConfig(seed=1)


def test_replace_returns_a_validated_copy():
    c = HyperConfig()
    d = c.replace(block_size=64, causal_depth=3)
    assert (d.block_size, d.causal_depth, c.block_size) == (64, 3, 256)
    with pytest.raises(ValueError, match="block_size"):
        c.replace(block_size=0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 1),
        ("sample_size", 0),
        ("lsh_num_projs", 1),
        ("lsh_num_projs", 30),
        ("min_seq_len", 1),
        ("causal_depth", 0),
        ("causal_depth", 30),
        ("causal_depth", None),
        ("seed", 0),
        ("seed", 2**62),
    ],
)
def test_boundary_values_are_accepted(field, value):
    assert getattr(HyperConfig(**{field: value}), field) == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 0),
        ("block_size", -256),
        ("block_size", 16.0),
        ("block_size", "256"),
        ("block_size", True),
        ("block_size", None),
        ("sample_size", -1),
        ("sample_size", 1.5),
        ("lsh_num_projs", 0),
        ("lsh_num_projs", 31),
        ("lsh_num_projs", False),
        ("min_seq_len", 0),
        ("min_seq_len", -1),
        ("causal_depth", -1),
        ("causal_depth", 31),
        ("causal_depth", 2.0),
        ("seed", -1),
        ("seed", 2**62 + 1),
        ("seed", "0"),
    ],
)
def test_invalid_values_raise_valueerror_naming_the_field(field, value):
    with pytest.raises(ValueError) as info:
        HyperConfig(**{field: value})
    assert field in str(info.value)
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("field", ["block_size", "sample_size", "min_seq_len"])
def test_values_beyond_int64_are_rejected_naming_the_field(field):
    with pytest.raises(ValueError, match=field):
        HyperConfig(**{field: 2**63})


# ----------------------------------------------------------------------------------------------------------
# OpSettings: what the op receives, resolved before it runs
# ----------------------------------------------------------------------------------------------------------


def test_settings_from_a_config_are_fully_explicit():
    c = HyperConfig(block_size=64, causal_depth=None, seed=5)
    s = OpSettings.of(c)
    assert s.for_length(1) == s.for_length(10**9) == c
    assert OpSettings.decode(s.encode()) == s
    assert OpSettings.decode(OpSettings.of(HyperConfig(causal_depth=2)).encode()).configs[0].causal_depth == 2


def test_explicit_fields_win_over_tuned_ones_and_the_rest_come_from_the_table():
    table = [(0, {"sample_size": 64, "block_size": 32}), (5793, {"sample_size": 128})]
    s = op_settings({"sample_size": 32, "causal_depth": None}, table)
    assert s.starts == (0, 5793)
    assert [c.sample_size for c in s.configs] == [32, 32], "explicit beats tuned at every length"
    assert s.for_length(5792).block_size == 32 and s.for_length(5793).block_size == DEFAULTS.block_size
    assert s.for_length(10**6).causal_depth is None


def test_nothing_given_is_the_defaults_and_equal_buckets_merge():
    assert op_settings({}) == OpSettings.of(DEFAULTS)
    assert op_settings({"seed": 3}, [(0, {"seed": 1}), (100, {"seed": 2})]).configs == (DEFAULTS.replace(seed=3),)
    assert resolve({"seed": 3}, {"seed": 1, "block_size": 8}) == DEFAULTS.replace(seed=3, block_size=8)


def test_settings_text_is_canonical_and_refuses_other_versions():
    a = op_settings({"seed": 1}, kernels="cpu").encode()
    assert a == op_settings({"seed": 1}, kernels="cpu").encode() and '"kernels":"cpu"' in a
    with pytest.raises(ValueError, match="version-1"):
        OpSettings.decode(a.replace('"v":1', '"v":2'))
    with pytest.raises(ValueError):
        OpSettings((DEFAULTS, DEFAULTS), (0, 0))


# ----------------------------------------------------------------------------------------------------------
# read_env
# ----------------------------------------------------------------------------------------------------------

INT_VARS = [
    ("HYPER_BLOCK_SIZE", "block_size", "128", 128),
    ("HYPER_SAMPLE_SIZE", "sample_size", " 0 ", 0),
    ("HYPER_LSH_PROJS", "lsh_num_projs", "9", 9),
    ("HYPER_MIN_SEQ_LEN", "min_seq_len", "1024", 1024),
    ("HYPER_CAUSAL_DEPTH", "causal_depth", "3", 3),
    ("HYPER_SEED", "seed", "42", 42),
]


def test_empty_environment_gives_no_options():
    assert read_env({}) == {}
    assert read_env({"PATH": "/bin", "HYPERX": "1"}) == {}


@pytest.mark.parametrize("var, field, raw, value", INT_VARS)
def test_integer_vars_parse(var, field, raw, value):
    assert read_env({var: raw}) == {field: value}


@pytest.mark.parametrize("var, field", [(v, f) for v, f, _, _ in INT_VARS])
@pytest.mark.parametrize("raw", ["abc", "1.5", "-5", "1e3"])
def test_integer_vars_reject_bad_values_naming_the_variable(var, field, raw):
    with pytest.raises(EnvError) as info:
        read_env({var: raw})
    assert isinstance(info.value, ValueError)
    assert var in str(info.value) and raw in str(info.value)


@pytest.mark.parametrize("var", ["HYPER_BLOCK_SIZE", "HYPER_MIN_SEQ_LEN", "HYPER_LSH_PROJS"])
def test_integer_vars_reject_values_outside_the_config_range(var):
    with pytest.raises(EnvError, match=var):
        read_env({var: "0"})


@pytest.mark.parametrize("raw", ["none", "None", "AUTO", ""])
def test_causal_depth_accepts_none_forms(raw):
    assert read_env({"HYPER_CAUSAL_DEPTH": raw}) == {"causal_depth": None}


@pytest.mark.parametrize(
    "raw, value",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("off", False),
    ],
)
def test_hyper_attention_switch(raw, value):
    assert read_env({"HYPER_ATTENTION": raw}) == {"enabled": value}


@pytest.mark.parametrize("raw", ["2", "enable", ""])
def test_hyper_attention_switch_rejects_other_values(raw):
    with pytest.raises(EnvError, match="HYPER_ATTENTION"):
        read_env({"HYPER_ATTENTION": raw})


def test_layers_var_parses_and_errors_name_it():
    assert read_env({"HYPER_LAYERS": "first:2"}) == {"layers": LayerSelection("first", count=2)}
    with pytest.raises(EnvError, match="HYPER_LAYERS"):
        read_env({"HYPER_LAYERS": "first:x"})


def test_tune_cache_var_is_stripped():
    assert read_env({"HYPER_TUNE_CACHE": "  /tmp/t.json\n"}) == {"tune_cache": "/tmp/t.json"}


@pytest.mark.parametrize("raw", ["inductor", "AOT_EAGER", " eager "])
def test_inner_backend_var(raw):
    assert read_env({"HYPER_INNER_BACKEND": raw}) == {"inner_backend": raw.strip().lower()}


def test_inner_backend_var_rejects_unknown_backends():
    with pytest.raises(EnvError, match="HYPER_INNER_BACKEND"):
        read_env({"HYPER_INNER_BACKEND": "cudagraphs"})


def test_several_vars_at_once():
    env = {"HYPER_ATTENTION": "1", "HYPER_BLOCK_SIZE": "64", "HYPER_SEED": "3", "HYPER_LAYERS": "0,2"}
    assert read_env(env) == {
        "enabled": True,
        "block_size": 64,
        "seed": 3,
        "layers": LayerSelection("set", indices=frozenset({0, 2})),
    }


def test_read_env_defaults_to_the_process_environment(monkeypatch):
    for var in list(os.environ):
        if var.startswith("HYPER_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HYPER_SAMPLE_SIZE", "77")
    assert read_env() == {"sample_size": 77}


@pytest.mark.parametrize("raw, choice", [(None, "auto"), ("auto", "auto"), ("CPU", "cpu"), (" triton", "triton")])
def test_kernel_choice(raw, choice):
    assert read_env({} if raw is None else {"HYPER_KERNELS": raw}).get("kernels", "auto") == choice


def test_kernel_choice_rejects_unknown_values():
    with pytest.raises(EnvError, match="HYPER_KERNELS"):
        read_env({"HYPER_KERNELS": "cuda"})


def test_default_tune_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HYPER_TUNE_CACHE", f" {tmp_path}/x.json ")
    assert default_tune_cache() == f"{tmp_path}/x.json"
    monkeypatch.setenv("HYPER_TUNE_CACHE", "  ")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_tune_cache() == os.path.join(str(tmp_path), "hyper_backend", "tune.json")
    monkeypatch.delenv("HYPER_TUNE_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_tune_cache() == os.path.join(str(tmp_path / "home"), ".cache", "hyper_backend", "tune.json")


# ----------------------------------------------------------------------------------------------------------
# LayerSelection
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all", LayerSelection("all")),
        (" ALL ", LayerSelection("all")),
        ("none", LayerSelection("none")),
        ("first:3", LayerSelection("first", count=3)),
        ("first:0", LayerSelection("first", count=0)),
        ("Last:2", LayerSelection("last", count=2)),
        ("5", LayerSelection("set", indices=frozenset({5}))),
        ("0,2,10-13", LayerSelection("set", indices=frozenset({0, 2, 10, 11, 12, 13}))),
        ("0, 2 , 4-4", LayerSelection("set", indices=frozenset({0, 2, 4}))),
        ("3,1-2,2", LayerSelection("set", indices=frozenset({1, 2, 3}))),
        ([0, 2], LayerSelection("set", indices=frozenset({0, 2}))),
        ((1,), LayerSelection("set", indices=frozenset({1}))),
        (frozenset(), LayerSelection("set", indices=frozenset())),
    ],
)
def test_layer_selection_parses(text, expected):
    assert LayerSelection.parse(text) == expected


def test_layer_selection_parse_passes_a_selection_through():
    s = LayerSelection("last", count=1)
    assert LayerSelection.parse(s) is s


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "first:",
        "first:-1",
        "first:x",
        "last:",
        "last:1.5",
        "first3",
        "3-1",
        "a",
        "1,,2",
        "-1",
        "1-",
        "1-2-3",
        "0;2",
        [1, -1],
        [True],
        [1.5],
        ["1"],
        1.5,
        None,
        3,
    ],
)
def test_layer_selection_rejects_bad_forms_listing_the_accepted_ones(bad):
    with pytest.raises(ValueError) as info:
        LayerSelection.parse(bad)
    assert "accepted forms" in str(info.value)


def test_layer_selection_contains():
    idx = range(6)
    assert [LayerSelection.parse("all").contains(i, 6) for i in idx] == [True] * 6
    assert [LayerSelection.parse("none").contains(i, 6) for i in idx] == [False] * 6
    assert [i for i in idx if LayerSelection.parse("first:2").contains(i, None)] == [0, 1]
    assert [i for i in idx if LayerSelection.parse("last:2").contains(i, 6)] == [4, 5]
    assert [i for i in idx if LayerSelection.parse("last:9").contains(i, 6)] == list(idx)
    assert [i for i in idx if LayerSelection.parse("1,3-4").contains(i, None)] == [1, 3, 4]
    with pytest.raises(ValueError, match="total"):
        LayerSelection.parse("last:2").contains(0, None)


def test_layer_selection_key_is_stable_and_distinct():
    assert LayerSelection.parse("3,1,2").key() == LayerSelection.parse("1-3").key() == "set:1,2,3"
    keys = {LayerSelection.parse(t).key() for t in ("all", "none", "first:2", "last:2", "2", "1,2")}
    assert len(keys) == 6
