"""Per-model calibration (hyper_backend.autotune.calibrate), its cache records, and layers="auto" in the backend,
on tiny random HF models (no downloads)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hyper_backend import explain  # noqa: E402
from hyper_backend.auto_layers import AutoLayersWarning, _auto_warned  # noqa: E402
from hyper_backend.autotune import assign, fingerprint, models, replay, schema, store, writer  # noqa: E402
from hyper_backend.autotune import calibrate as C  # noqa: E402
from hyper_backend.autotune.grid import Space  # noqa: E402
from hyper_backend.config import HyperConfig as _Config  # noqa: E402
from hyper_backend.config import LayerSelection, read_env  # noqa: E402


def HyperConfig(*args, **fields):  # noqa: N802
    """The tuner and the calibration search the LSH estimator's sizes: these tests' configs are LSH configs."""
    return _Config(*args, **{"detector": "lsh", **fields})


def tiny_llama(layers=3, hidden=256, heads=4, kv_heads=2, positions=8192, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=positions,
        attn_implementation="sdpa",
        **extra,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


FRAGILE = 1


@pytest.fixture(scope="module")
def fragile_model():
    """Three layers; layer 1's attention is sharp (q, k scaled up: the sampled estimator misses its heavy keys)
    and loud (o_proj scaled up), layers 0 and 2 barely reach the output (o_proj scaled down); a sharp head."""
    model = tiny_llama()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            if i == FRAGILE:
                for proj in (a.q_proj, a.k_proj, a.o_proj):
                    proj.weight.mul_(6)
            else:
                a.o_proj.weight.mul_(0.05)
        model.lm_head.weight.mul_(30)
    return model


def _settings(budget=0.01, perplexity=False, **space):
    # a small search space (three thresholds x one size) so the test stays short on a busy machine
    axes = dict(min_seq_len=1024, block_sizes=(128,), sample_sizes=(128,), sink_keys=(16,), local_windows=(None,))
    return C.CalibrationSettings(
        seq=8192, budget=budget, space=Space(**{**axes, **space}), error_rows=128, repeats=2, perplexity=perplexity
    )


def test_budget_is_honoured_and_the_fragile_site_stays_exact(fragile_model, tmp_path):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 8192), generator=g)
    result = C.calibrate(fragile_model, ids[:1], ids[1:], _settings(perplexity=True))
    by = {s.index: s for s in result.sites}
    assert result.num_sites == 3 and all(s.status == "candidate" for s in result.sites)
    # the fragile site is fragile: approximating it alone moves the loss by more than the whole budget (measured;
    # which probe is measured depends on the timings, and a very wrong one can also lower the loss: a cost of
    # its size for the calibration)
    assert by[FRAGILE].probe.measured and abs(by[FRAGILE].probe.dloss) > math.log1p(0.01)
    assert by[FRAGILE].choice is None
    # something was approximated, and the verification on the held-out window passed within the budget
    assert result.assignment and FRAGILE not in result.assignment
    assert result.passed and result.verifications
    last = result.verifications[-1]
    assert sorted(last.assignment) == sorted(result.assignment)
    assert last.change <= 0.01
    # the verified perplexity is a real one: recompute it with the sites swapped in a plain forward
    from hyper_backend.capture import AttentionSites

    body, head, softcap = models.body_and_head(fragile_model)
    with torch.no_grad(), AttentionSites(replay.swap_handler(result.assignment)):
        hidden = body(input_ids=ids[1:], use_cache=False).last_hidden_state
    s, n = models.chunked_nll(hidden[:, :-1], ids[1:, 1:], head, softcap, 512)
    assert math.exp(float(s) / n) == pytest.approx(last.ppl, rel=1e-4)
    times = result.attention_times()
    assert times["assignment"] < times["exact"]

    # the record: the fragile site exact with a reason, the others with their params; through the cache file
    path = str(tmp_path / "tune.json")
    entry = C.record(path, fragile_model, result, torch.float32)
    assert "exact" in entry["sites"][str(FRAGILE)] and "over budget" in entry["sites"][str(FRAGILE)]["exact"]
    got = store.lookup_model(path, config=fragile_model.config, dtype=torch.float32, seq_len=8192, sites_seen=3)
    assert got["sites"] == json.loads(json.dumps(entry["sites"]))
    for i, c in result.assignment.items():
        assert HyperConfig(**got["sites"][str(i)]["params"]) == c


def test_a_budget_of_nothing_keeps_every_site_exact(fragile_model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (2, 8192), generator=g)
    result = C.calibrate(fragile_model, ids[:1], ids[1:], _settings(budget=1e-9, block_sizes=(256,), min_seq_len=4096))
    assert result.assignment == {} and not result.verifications


def test_solver_is_a_knapsack_over_sites():
    def site(i, exact, *opts):
        s = assign.SiteResult(i, i, 8192, True, "candidate", exact_time=exact)
        s.options = [
            assign.Option(HyperConfig(block_size=64 * (j + 1)), t, 0.1, dloss=d) for j, (t, d) in enumerate(opts)
        ]
        return s

    sites = [site(0, 1.0, (0.2, 0.008), (0.5, 0.001)), site(1, 1.0, (0.3, 0.004)), site(2, 1.0, (0.9, 0.02))]
    assert assign.solve(sites + [site(3, 1.0, (0.1, -0.0045))], allowed=0.005).keys() == {
        0,
        1,
    }  # a decrease is not free
    picks = assign.solve(sites, allowed=0.005)
    # best within 0.005: site 0's slower option (0.001) + site 1 (0.004); site 2 exceeds the budget alone
    assert {i: o.time for i, o in picks.items()} == {0: 0.5, 1: 0.3}
    assert assign.solve(sites, allowed=0.005, scale=2.0).keys() == {0}
    assert assign.solve(sites, allowed=0.0) == {}


def test_prediction_errs_high_on_both_sides_of_the_probe():
    probe = assign.Option(HyperConfig(), 1.0, 0.2, dloss=0.01, measured=True)
    assert assign.predict(probe, 0.2) == pytest.approx(0.01)
    assert assign.predict(probe, 0.4) == pytest.approx(0.04)  # squared above
    assert assign.predict(probe, 0.1) == pytest.approx(0.005)  # linear below
    assert assign.predict(assign.Option(HyperConfig(), 1.0, 0.2, dloss=-0.01), 0.4) == pytest.approx(
        0.04
    )  # noise, not free


def test_two_probes_no_config_is_charged_less_than_a_more_accurate_one_predicts():
    """An accurate probe whose measured effect is noise (an accurate config at a fragile site) must not make the
    faster configs there look free, and a very wrong probe that lowered the loss by chance must not be free."""

    def probe(error, dloss):
        return assign.Option(HyperConfig(), 1.0, error, dloss=dloss, measured=True, measured_dloss=dloss)

    accurate, fast = probe(0.08, -0.0005), probe(0.16, 0.015)
    between = assign.Option(HyperConfig(), 0.8, 0.12)
    assert assign.predict(accurate, 0.12) == pytest.approx(0.0005 * (0.12 / 0.08) ** 2)  # one probe: 0.11%
    assert assign.predict_from([accurate, fast], between) == pytest.approx(0.015 * 0.12 / 0.16)  # both: 1.1%
    assert assign.predict_from([accurate, fast], accurate) == pytest.approx(0.0005)  # its measurement stands
    assert assign.predict_from([accurate, fast], fast) == pytest.approx(0.015)
    lucky = probe(0.99, -0.001)  # the fragile site of the test above: wrong, yet the loss fell
    sharp = probe(0.77, 0.027)
    assert assign.predict_from([sharp, lucky], lucky) == pytest.approx(0.027 * (0.99 / 0.77) ** 2)


# ----------------------------------------------------------------------------------------------------------
# fingerprint and cache records
# ----------------------------------------------------------------------------------------------------------


def test_fingerprint_changes_with_the_model_config_not_its_path():
    a = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64)
    b = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64)
    b._name_or_path = "/somewhere/else"
    assert fingerprint.model_fingerprint(a, 2) == fingerprint.model_fingerprint(b, 2)
    assert fingerprint.model_fingerprint(a, 2) != fingerprint.model_fingerprint(a, 3)  # the site count is part of it
    for change in (
        {"num_hidden_layers": 3},
        {"hidden_size": 128},
        {"rope_theta": 500000.0},
        {"num_key_value_heads": 1},
    ):
        c = transformers.LlamaConfig(**{"num_hidden_layers": 2, "hidden_size": 64, **change})
        assert fingerprint.config_hash(c) != fingerprint.config_hash(a), change


def _record(model, sites, n=64, num_sites=None, dtype="float32"):
    """A calibration record of a tiny Llama (site i: layer i's attention module, as the calibration names it)."""
    return schema.make_model(
        config=model.config,
        num_sites=num_sites or model.config.num_hidden_layers,
        dtype=dtype,
        seq_len=n,
        sites=sites,
        modules={i: f"layers.{i}.self_attn" for i in sites},
        model_type="llama",
    )


def test_model_records_round_trip_and_keep_other_sections(tmp_path):
    path = str(tmp_path / "tune.json")
    model = tiny_llama(layers=2, hidden=64, positions=128)
    writer.record(
        path,
        entries=[
            schema.make_entry(
                device="cpu:x",
                dtype="float32",
                head_dim=64,
                causal=True,
                seq_len=4096,
                params={"block_size": 128},
                tuned={},
            )
        ],
    )
    params = HyperConfig(block_size=32, sample_size=32, min_seq_len=16).as_dict()
    writer.record(
        path,
        models=[
            _record(model, {0: {"params": params}, 1: {"exact": "fragile"}}, n=64),
            _record(model, {0: {"exact": "x"}, 1: {"exact": "y"}}, n=8192),
        ],
    )
    data = json.load(open(path))
    assert data["version"] == schema.VERSION and len(data["entries"]) == 1 and len(data["models"]) == 2
    near = store.lookup_model(path, config=model.config, dtype=torch.float32, seq_len=80, sites_seen=2)
    assert (
        near["bucket"] == 64 and near["sites"]["0"]["params"] == params and near["sites"]["1"] == {"exact": "fragile"}
    )
    assert (
        store.lookup_model(path, config=model.config, dtype=torch.float32, seq_len=6000, sites_seen=2)["bucket"] == 8192
    )
    assert store.lookup_model(path, config=model.config, dtype=torch.bfloat16, seq_len=64, sites_seen=2) is None
    assert store.lookup_model(path, config=model.config, dtype=torch.float32, seq_len=64, sites_seen=3) is None
    other = tiny_llama(layers=3, hidden=64, positions=128)
    assert store.lookup_model(path, config=other.config, dtype=torch.float32, seq_len=64, sites_seen=2) is None
    # a bad record is refused on write and ignored (with a warning) on read
    with pytest.raises(ValueError):
        _record(model, {5: {"params": params}})
    data["models"]["junk"] = {"fingerprint": "x"}
    json.dump(data, open(path, "w"))
    with pytest.warns(store.CacheWarning, match="models"):
        assert store.lookup_model(path, config=model.config, dtype=torch.float32, seq_len=64, sites_seen=2)


# ----------------------------------------------------------------------------------------------------------
# layers="auto" in the backend
# ----------------------------------------------------------------------------------------------------------


def test_hyper_layers_auto_parses():
    assert read_env({"HYPER_LAYERS": "auto"})["layers"] == LayerSelection("auto")
    assert LayerSelection.parse("AUTO").key() == "auto"


def _explain(model, ids, **options):
    torch._dynamo.reset()
    return explain(model.model, input_ids=ids, options={"inner_backend": "eager", **options})


def test_auto_without_an_entry_warns_once_and_swaps_every_site(tmp_path):
    model = tiny_llama(layers=2, hidden=64, positions=128, seed=3)
    ids = torch.randint(0, 256, (1, 64))
    _auto_warned.clear()
    with pytest.warns(AutoLayersWarning, match="no calibration for this model"):
        report = _explain(model, ids, layers="auto", tune_cache=str(tmp_path / "none.json"), min_seq_len=16)
    assert [s.decision for s in report.sites] == ["hyper", "hyper"]
    assert all("as layers=all" in report.config_of(s) for s in report.sites)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoLayersWarning)  # once per model and process
        report = _explain(model, ids, layers="auto", tune_cache=str(tmp_path / "none.json"), min_seq_len=16)
    assert report.rewritten == 2


def test_auto_applies_the_calibration_and_explicit_fields_win(tmp_path):
    path = str(tmp_path / "tune.json")
    model = tiny_llama(layers=3, hidden=64, positions=128, seed=4)
    ids = torch.randint(0, 256, (1, 64))
    params = HyperConfig(block_size=16, sample_size=16, min_seq_len=16, sink_keys=2, local_window=4).as_dict()
    writer.record(
        path,
        models=[
            _record(
                model,
                {
                    0: {"exact": "fragile: over budget"},
                    1: {"params": params},
                    2: {"params": dict(params, block_size=32)},
                },
            )
        ],
    )
    _auto_warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoLayersWarning)
        report = _explain(model, ids, layers="auto", tune_cache=path)
    assert [s.decision for s in report.sites] == ["exact", "hyper", "hyper"]
    assert report.sites[0].reason == "auto: tuned for this model at 64: exact (fragile: over budget)"
    assert report.config_of(report.sites[1]) == f"auto: tuned for this model at 64: {HyperConfig(**params).label()}"
    assert "b=32 " in report.config_of(report.sites[2])
    from rich.console import Console

    console = Console(width=400, record=True, file=io.StringIO())
    console.print(report.table())
    assert "auto: tuned for this model at 64: exact (fragile: over budget)" in console.export_text()
    # explicit options win field by field: sample_size from options, block_size still the tuned one
    report = _explain(model, ids, layers="auto", tune_cache=path, sample_size=8)
    assert "b=16 m=8 " in report.config_of(report.sites[1]) and "(explicit: sample_size)" in report.config_of(
        report.sites[1]
    )
    assert report.sites[0].decision == "exact"
    # the op really runs the site's config: the compiled model equals the eager swap with those configs
    torch._dynamo.reset()
    compiled = torch.compile(
        model.model, backend="hyper", options={"layers": "auto", "tune_cache": path, "inner_backend": "eager"}
    )
    with torch.no_grad():
        got = compiled(input_ids=ids).last_hidden_state
        from hyper_backend.capture import AttentionSites

        with AttentionSites(
            replay.swap_handler({1: HyperConfig(**params), 2: HyperConfig(**dict(params, block_size=32))})
        ):
            want = model.model(input_ids=ids).last_hidden_state
        exact = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, exact, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------
# layers="auto": configs that identify no model (issue 18 item 8), and sites it must not misplace (item 9)
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Slots:
    hidden: int = 32


class _RaisingConfig:
    def to_dict(self):
        raise RuntimeError("no dict today")


class _Carrier(torch.nn.Module):
    """A module whose ``config`` is whatever the test gives it, around one causal SDPA call."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.proj(x).view(1, x.shape[1], 3, 1, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize(
    "config, why",
    [
        ("a string", "of type str"),
        (7, "of type int"),
        ([1, 2], "of type list"),
        (_Slots(), "no calibration for this model"),
        (_RaisingConfig(), "to_dict() raised RuntimeError"),
    ],
    ids=["str", "int", "list", "slots-dataclass", "to_dict-raises"],
)
def test_auto_with_a_config_that_identifies_no_model_warns_once_and_swaps_every_site(config, why, tmp_path):
    """The compile used to fail with ``TypeError: vars() argument must have __dict__``: the documented behaviour is
    one warning, then every site as ``layers="all"``."""
    path = str(tmp_path / "tune.json")
    writer.record(
        path,
        [
            schema.make_entry(
                device="cpu:x",
                dtype="float32",
                head_dim=16,
                causal=True,
                seq_len=64,
                params={"block_size": 16},
                tuned={},
            )
        ],
    )
    _auto_warned.clear()
    x = torch.randn(1, 64, 16)
    for attempt in range(2):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = explain(
                _Carrier(config),
                x,
                options={
                    "layers": "auto",
                    "tune_cache": path,
                    "inner_backend": "eager",
                    "min_seq_len": 16,
                    "block_size": 16,
                    "sample_size": 16,
                },
            )
        auto = [w for w in caught if issubclass(w.category, AutoLayersWarning)]
        assert len(auto) == (1 if attempt == 0 else 0), [str(w.message) for w in auto]  # once per process
        if auto:
            assert why in str(auto[0].message) and "as layers='all'" in str(auto[0].message)
        assert [s.decision for s in report.sites] == ["hyper"]
    torch._dynamo.reset()


class _Plain:
    def __init__(self, scale):
        self.scale = scale


class _Opaque:
    __slots__ = ("scale",)

    def __init__(self, scale):
        self.scale = scale


def test_config_hash_is_content_not_memory_addresses():
    """A config holding a plain object hashed its ``repr`` (a memory address), so no calibration could match it in
    another process: equal content hashes equal, and content with no stable form is refused, naming the field."""
    a, b = _Plain(2.0), _Plain(2.0)  # both alive: two addresses
    assert fingerprint.config_hash({"rope": a, "n": 1}) == fingerprint.config_hash({"n": 1, "rope": b})
    assert fingerprint.config_hash({"rope": _Plain(2.0)}) != fingerprint.config_hash({"rope": _Plain(3.0)})
    assert fingerprint.config_hash({"kinds": {"b", "a"}}) == fingerprint.config_hash({"kinds": {"a", "b"}})
    with pytest.raises(fingerprint.UnstableConfig, match=r"config\.rope .*_Opaque.*memory address"):
        fingerprint.config_hash({"rope": _Opaque(2.0)})
    with pytest.raises(fingerprint.UnstableConfig, match="nested more than"):
        loop = {}
        loop["self"] = loop
        fingerprint.config_hash(loop)


class _Attn(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, x.shape[1], 3, 1, x.shape[2]).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(x.shape)


class _Layer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config  # as in the issue: every layer carries the model's config
        self.attn = _Attn()

    def forward(self, x):
        return x + self.attn(x)


class _Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {"model": "two layers", "hidden": 16}
        self.layers = torch.nn.ModuleList([_Layer(self.config) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


_OPTS = dict(inner_backend="eager", layers="auto")


def _stack_record(path, model, site1):
    params = HyperConfig(block_size=16, sample_size=16, min_seq_len=16).as_dict()
    writer.record(
        path,
        models=[
            schema.make_model(
                config=model.config,
                num_sites=2,
                dtype="float32",
                seq_len=64,
                sites={0: {"params": params}, 1: site1 if site1 is not None else {"params": params}},
                modules={0: "layers.0.attn", 1: "layers.1.attn"},
            )
        ],
    )
    return params


def test_auto_on_one_compiled_layer_never_applies_another_sites_calibration(tmp_path):
    """Site 0 calibrated to HyperAttention, site 1 exact. Compiling ``model.layers[1]`` alone numbers its site 0, and
    the 2-site record was accepted, so the layer calibrated exact ran HyperAttention (issue 18 item 9). A graph
    compiled on a layer may serve either layer (Dynamo reuses it for every copy): it stays exact, with why."""
    path = str(tmp_path / "tune.json")
    model = _Stack().eval()
    _stack_record(path, model, {"exact": "fragile: over budget"})
    x = torch.randn(1, 64, 16)
    _auto_warned.clear()
    torch._dynamo.reset()
    whole = explain(model, x, options=dict(_OPTS, tune_cache=path))
    assert [s.decision for s in whole.sites] == ["hyper", "exact"]
    assert whole.sites[1].reason == "auto: tuned for this model at 64: exact (fragile: over budget)"
    for layer in (model.layers[1], model.layers[0]):
        torch._dynamo.reset()
        with pytest.warns(AutoLayersWarning, match="calibrated differently"):
            _auto_warned.clear()
            part = explain(layer, x, options=dict(_OPTS, tune_cache=path))
        assert [s.decision for s in part.sites] == ["exact"]
        assert "recorded sites 0-1, calibrated differently" in part.sites[0].reason
    torch._dynamo.reset()


def test_auto_on_one_compiled_layer_applies_what_every_site_it_may_be_shares(tmp_path):
    path = str(tmp_path / "tune.json")
    model = _Stack().eval()
    params = _stack_record(path, model, None)
    x = torch.randn(1, 64, 16)
    _auto_warned.clear()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoLayersWarning)
        part = explain(model.layers[1], x, options=dict(_OPTS, tune_cache=path))
    assert [s.decision for s in part.sites] == ["hyper"]
    assert part.config_of(part.sites[0]) == (
        f"auto: tuned for this model at 64: {HyperConfig(**params).label()} (shared by recorded sites 0-1)"
    )
    torch._dynamo.reset()


def test_auto_on_an_hf_decoder_layer_stays_exact_where_the_layers_differ(tmp_path):
    """The same with a real HF layer (its config is on its attention module, not on the layer)."""
    path = str(tmp_path / "tune.json")
    model = tiny_llama(layers=2, hidden=64, positions=128, seed=6)
    params = HyperConfig(block_size=16, sample_size=16, min_seq_len=16).as_dict()
    writer.record(path, models=[_record(model, {0: {"params": params}, 1: {"exact": "fragile"}})])
    ids = torch.randint(0, 256, (1, 64))
    _auto_warned.clear()
    assert [s.decision for s in _explain(model, ids, layers="auto", tune_cache=path).sites] == ["hyper", "exact"]
    h = torch.randn(1, 64, 64)
    pos = model.model.rotary_emb(h, torch.arange(64)[None])
    torch._dynamo.reset()
    with pytest.warns(AutoLayersWarning, match="calibrated differently"):
        part = explain(
            model.model.layers[1], h, position_embeddings=pos, attention_mask=None, options=dict(_OPTS, tune_cache=path)
        )
    assert [s.decision for s in part.sites] == ["exact"]
    torch._dynamo.reset()


def test_the_calibration_records_the_module_paths_the_backend_places(tmp_path):
    """What the calibration's eager pass records as each site's module is what the compiled graph's sites carry,
    compiled from the model, its body, or with a wrapper around it."""
    model = tiny_llama(layers=2, hidden=64, positions=128, seed=7)
    ids = torch.randint(0, 256, (1, 64))
    recorded = replay.Runner(model).run(ids, record=True, loss=False).site_modules
    assert recorded == {0: "layers.0.self_attn", 1: "layers.1.self_attn"}
    path = str(tmp_path / "tune.json")
    params = HyperConfig(block_size=16, sample_size=16, min_seq_len=16).as_dict()
    writer.record(
        path,
        models=[
            schema.make_model(
                config=model.config,
                num_sites=2,
                dtype="float32",
                seq_len=64,
                sites={0: {"exact": "fragile"}, 1: {"params": params}},
                modules=recorded,
            )
        ],
    )

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).logits

    _auto_warned.clear()
    for compiled in (model, model.model, Wrapper()):
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoLayersWarning)
            report = explain(compiled, input_ids=ids, options=dict(_OPTS, tune_cache=path))
        assert [s.decision for s in report.sites] == ["exact", "hyper"], type(compiled).__name__
        assert report.config_of(report.sites[1]) == (
            f"auto: tuned for this model at 64: {HyperConfig(**params).label()}"
        )
    torch._dynamo.reset()


def test_placement_by_module_path():
    from hyper_backend.auto_layers import place

    modules = {"0": "layers.0.self_attn", "1": "layers.1.self_attn", "2": "layers.1.cross_attn"}
    assert place(modules, "model.layers.1.self_attn") == ([1], True)  # compiled from above the body
    assert place(modules, "layers.0.self_attn") == ([0], True)  # the body itself
    assert place(modules, "self_attn") == ([0, 1], False)  # a layer: either of two
    assert place(modules, "cross_attn") == ([2], False)  # a layer, but only one layer has it
    assert place(modules, "layers.2.self_attn") == ([], False)  # not a recorded module
    assert place(modules, None) == ([0, 1, 2], False)  # no module path: any


def test_the_inductor_pass_uuid_covers_per_site_configs():
    from hyper_backend.lowering.patterns import AttentionPass
    from hyper_backend.lowering.sites import Policy, Site

    sites = {"softmax": Site(0, "attn", "attention", node="softmax")}

    def make(params):  # the backend's policy key holds every site's calibrated config
        policy = Policy(lambda site: True, lambda site, q, causal: (), (), repr(params))
        return AttentionPass(policy, sites, {}, "")

    assert make([1, 2]).uuid() == make([1, 2]).uuid()
    assert make([1, 2]).uuid() != make([1, 3]).uuid()


def test_cli_calibrates_an_hf_directory_and_writes_the_cache(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    model = tiny_llama(layers=2, hidden=64, positions=4096, seed=5, bos_token_id=1)
    model.save_pretrained(tmp_path / "m")
    fast.save_pretrained(tmp_path / "m")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in torch.randint(0, 200, (6000,), generator=g)))
    path = str(tmp_path / "tune.json")
    from hyper_backend.autotune.cli import main

    rc = main(
        [
            "--model",
            str(tmp_path / "m"),
            "--text",
            str(tmp_path / "t.txt"),
            "--seq",
            "2048",
            "--budget",
            "0.05",
            "--min-seq-len",
            "256",
            "--block-sizes",
            "64",
            "--sample-sizes",
            "64",
            "--sink-keys",
            "4",
            "--local-windows",
            "default",
            "--cache",
            path,
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "held-out tokens 2047+" in out and "calibration at 2k" in out and "wrote model" in out
    data = json.load(open(path))
    (record,) = data["models"].values()
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "m")
    assert record["fingerprint"] == fingerprint.model_fingerprint(loaded, 2) and record["bucket"] == 2048
    assert sorted(record["sites"]) == ["0", "1"]
    for site in record["sites"].values():
        assert ("params" in site) != ("exact" in site)
    full = json.load(open(tmp_path / "out.json"))
    assert [s["status"] for s in full["sites"]] == ["candidate", "candidate"]
