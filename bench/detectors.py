"""The oracle bench: how well each detector finds the large entries of attention, against an oracle top-k, on Q/K/V
captured from the global layers of Gemma-3-270m.

    python bench/detectors.py --seq 8192                      # KJV tokens 100000+ and a passkey prompt, all heads
    python bench/detectors.py --seq 8192 --layers 5 --heads 0,1 --prompts kjv --repeats 1   # a quick look

**Captures.** One exact forward of the model body (`hyper_backend.capture.capture_attention`) records q, k, v of
``--layers`` (Gemma-3-270m's global layers are 5, 11, 17: 4 query heads on 1 KV head, d = 256):

- ``kjv``: BOS + ``--seq - 1`` tokens of the King James Bible from token ``--offset``;
- ``passkey``: the passkey prompt of `hyper_backend.needles` (repeated filler, the needle at ``--depth``), with its
  answer, ``--seq`` tokens.

They are cached under ``~/.cache/hyper-backend/detectors/`` (about 150 MB each at 8k) and recomputed when absent.

**Rows.** Every estimator is a dense ``[Nq, Nk]`` log-weight matrix ``log W`` (0: the key is exact for the query; a
finite value: a reweighted residual draw; -inf: not attended), and its output is ``softmax(s + log W) @ v``:

- the op's detectors through the project's dense reference, `hyper_backend.kernels.reference.log_weights`, on the
  whole layer (all query heads with their shared KV head, as the op sees them);
- the *flat oracle*: each query's true top-K keys outside the sinks and its window, exact, plus a residual of
  ``m`` uniform draws (per query, with replacement) over the rest of those keys, each weighted (rest count) / m;
- the *block oracle*: the same, with one top-K shared by each block of 64 queries, chosen by the block's summed
  exact softmax mass.

Both oracles keep the first ``SINKS`` keys and each query's ``WINDOW`` most recent keys exact, as the op does.

**Metrics** (float64, causal):

- *row error*: ``||o_est - o_exact|| / ||o_exact||`` per row, the mean over rows ``>= --rows-from`` and all heads;
- *recall*: the share of each query's exact top-32 softmax mass, among the keys outside the sinks and its window,
  that the estimator keeps exactly (``log W == 0``); mean over the same rows;
- *keys per query*: finite log-weights per row (distinct keys attended), mean over all rows;
- *vs oracle*: the row error minus the flat oracle's at the same keys per query (piecewise linear in
  log(keys per query) between the oracle's K, constant beyond its ends);
- *detector cost*: the detector's multiply-adds as a share of exact causal QK^T (``d * n (n + 1) / 2`` per query
  head), analytic from the config: LSH hashes every query and key of every approximated sub-problem of the call
  plan with ``lsh_num_projs`` hyperplanes of d;
- *time*: the op's forward (`hyper_attention`, the CPU path) on the first layer's q, k, v of the first prompt (the
  other prompt has the same shapes), over exact causal SDPA on the same tensors, the median of ``--repeats``
  interleaved runs, with the load average before and after;
- *needle* (passkey only): of the exact softmax mass that the queries predicting the answer put on the needle's
  tokens, the share the estimator keeps exactly (pooled over heads).

**Output.** A rich table per capture, ``bench/results/detectors_<seq>.json`` (every row per layer and head as well)
and ``bench/results/detectors_<seq>.png`` (row error and recall against keys per query, the oracles as lines).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_stamp, interleave, parse_config, write_json  # noqa: E402

from hyper_backend import HyperConfig, hyper_attention  # noqa: E402
from hyper_backend.kernels.plan import plan_call  # noqa: E402
from hyper_backend.kernels.reference import log_weights  # noqa: E402
from hyper_backend.kernels.topk import blocks, lead  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "hyper-backend", "detectors")
SINKS = 16  # the first keys, exact for every query (HyperConfig.sink_keys)
WINDOW = 128  # each query's most recent keys, itself included, exact (the causal local_window)
TOP = 32  # recall is measured on each query's top-32 keys outside the sinks and its window
QUERY_BLOCK = 64  # the block oracle shares one selection per block of this many queries
ORACLE_K = (256, 1024, 2048)
PROMPTS = ("kjv", "passkey")
TARGETS = {"error": (0.07, "row error <= 0.07"), "recall": (0.9, "recall >= 0.9")}  # issue 17's detector quality


# ----------------------------------------------------------------------------------------------------------
# what is measured: the rows of the table
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One estimator: the op at ``config`` (``kind="op"``) or an oracle (``"flat"``, ``"block"``) keeping ``top_k``
    keys per query (per block of queries) exact and drawing ``sample_size`` residual keys."""

    name: str
    kind: str
    config: HyperConfig | None = None
    top_k: int = 0
    sample_size: int = 256


APPROXIMATE = 4096  # topk's rows approximate from this length (its default threshold is above the captures')


def default_rows(configs: Sequence[str] = ()) -> list[Row]:
    """LSH at its defaults; topk at K x score_group with importance draws, and with the other residuals; the
    oracles. ``configs`` (``"top_k=2048,query_block=32"``, over topk's defaults) replace the op rows."""
    topk = HyperConfig(detector="topk", min_seq_len=APPROXIMATE)
    if configs:
        rows = [Row(f"topk {text}", "op", parse_config(topk, text)) for text in configs]
    else:
        rows = [Row("lsh (defaults)", "op", HyperConfig(detector="lsh"))]
        for k in (512, 1024, 2048):
            for g in (16, 64):
                rows.append(Row(f"topk K={k} g={g}", "op", topk.replace(top_k=k, score_group=g)))
        for res in ("uniform", "vnorm"):
            rows.append(Row(f"topk K=1024 g=16 {res}", "op", topk.replace(top_k=1024, residual=res)))
    rows += [Row(f"flat oracle K={k}", "flat", top_k=k) for k in ORACLE_K]
    rows += [Row(f"block oracle K={k}", "block", top_k=k) for k in ORACLE_K]
    return rows


def detector_cost(config: HyperConfig, n: int, group: int) -> float:
    """The detector's multiply-adds over exact causal QK^T's (``d n (n + 1) / 2`` per query head), for a causal
    self-attention of length ``n`` with ``group`` query heads per KV head, from its call plan (d cancels):

    - ``lsh``: every query (per query head) and key (per KV head) of every approximated sub-problem is projected on
      ``lsh_num_projs`` d-vectors;
    - ``topk``: each block's representatives (``ceil(query_block / score_group)`` per query head) score every key
      of its domain (the keys before its tile, the sinks included: a bound; the last block's too, as `topk.select`
      scores it), plus ``|v_j|^2`` for ``"vnorm"``.
    """
    plan = plan_call(n, n, True, config)
    total = n * (n + 1) / 2
    if config.detector == "lsh":
        hashed = sum(p.count * (p.sq + p.sk / group) for p in plan.parts if p.kind == "hyper")
        return hashed * config.lsh_num_projs / total
    work = 0.0
    for p in plan.parts:
        if p.kind != "topk":
            continue
        reps = math.ceil(p.block / config.score_group)
        first = -lead(p, n)  # blocks end at the last query: the first may be partial
        domain = sum(max(0, first + c * p.block - p.strip) for c in range(blocks(p, n)))
        work += reps * domain + (n / group if config.residual_scheme == "vnorm" else 0)
    return work / total


# ----------------------------------------------------------------------------------------------------------
# exact attention of one head, and the metrics of an estimator against it
# ----------------------------------------------------------------------------------------------------------


def outside(n: int, rows: torch.Tensor, sinks: int = SINKS, window: int = WINDOW) -> torch.Tensor:
    """``[len(rows), n]`` bool: the keys of each query row outside the sinks and its window, causal."""
    j = torch.arange(n)[None, :]
    return (j >= sinks) & (j <= rows[:, None] - window)


@dataclass
class Head:
    """Exact attention of one query head, kept for the rows the error is measured on (``>= r0``)."""

    r0: int
    s: torch.Tensor  # [n - r0, n] float64 scaled scores, -inf above the diagonal
    v: torch.Tensor  # [n, dv] float64
    out: torch.Tensor  # [n - r0, dv] exact output
    top_idx: torch.Tensor  # [n - r0, TOP] each row's top keys outside the sinks and its window
    top_mass: torch.Tensor  # [n - r0, TOP] their exact probabilities (0 where a row has fewer such keys)
    needle: tuple | None = None  # (rows >= r0, their exact probabilities [rows, n], the needle's keys (start, stop))


def exact_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, p)``: the ``[n, n]`` float64 causal scores of ``q [n, d]`` on ``k [n, d]`` and their softmax."""
    s = (q.double() @ k.double().T) * scale
    s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
    return s, torch.softmax(s, -1)


def make_head(s, p, v, r0: int, needle=None, sinks: int = SINKS, window: int = WINDOW) -> Head:
    """The exact side of one head from its scores and probabilities ``[n, n]``. ``needle``: ``(rows, (start,
    stop))``, the query rows (all ``>= r0``) and the needle's key span."""
    n = s.shape[0]
    tail = p[r0:]
    far = tail.masked_fill(~outside(n, torch.arange(r0, n), sinks, window), 0.0)
    top = far.topk(min(TOP, n), -1)
    if needle is not None:
        rows = torch.as_tensor(needle[0])
        needle = (rows, p[rows].clone(), needle[1])
    return Head(r0, s[r0:].clone(), v.double(), tail @ v.double(), top.indices, top.values, needle)


def metrics(head: Head, logw: torch.Tensor) -> dict:
    """Row error, recall, keys per query (and the needle's kept mass) of ``logw [n, n]`` against ``head``."""
    lw = logw[head.r0 :]
    est = torch.softmax(head.s + lw, -1) @ head.v
    err = (est - head.out).norm(dim=-1) / head.out.norm(dim=-1)
    exact = lw == 0
    mass = head.top_mass.sum(-1)
    has = mass > 0
    recall = (head.top_mass * exact.gather(1, head.top_idx)).sum(-1)[has] / mass[has]
    out = {
        "error": err.mean().item(),
        "recall": recall.mean().item() if has.any() else 1.0,
        "keys": torch.isfinite(logw).sum(-1).double().mean().item(),
    }
    if head.needle is not None:
        rows, p, (a, b) = head.needle
        out["needle_kept"] = (p[:, a:b] * exact[rows - head.r0, a:b]).sum().item()
        out["needle_mass"] = p[:, a:b].sum().item()
    return out


# ----------------------------------------------------------------------------------------------------------
# the oracles, as dense log-weights
# ----------------------------------------------------------------------------------------------------------


def oracle_log_weights(
    p: torch.Tensor,
    top_k: int,
    sample_size: int,
    shared: int = 1,
    generator: torch.Generator | None = None,
    sinks: int = SINKS,
    window: int = WINDOW,
) -> torch.Tensor:
    """``[n, n]`` log-weights of an oracle given the exact causal probabilities ``p [n, n]``: the sinks, each query's
    window, and the ``top_k`` keys outside them of largest exact mass are exact; ``sample_size`` uniform draws per
    query over its remaining keys outside, each weighted (remaining count) / ``sample_size``. ``shared > 1``: one
    top-k per block of ``shared`` queries, by their summed mass (a key is exact for a query only if outside its
    window and causal for it)."""
    n = p.shape[0]
    rows = torch.arange(n)
    dom = outside(n, rows, sinks, window)
    far = p.masked_fill(~dom, 0.0)
    keep = torch.zeros(n, n, dtype=torch.bool)
    k = min(top_k, n)
    if k:
        if shared == 1:
            keep.scatter_(1, far.topk(k, -1).indices, True)
        else:
            blocks = -(-n // shared)
            mass = F.pad(far, (0, 0, 0, blocks * shared - n)).view(blocks, shared, n).sum(1)
            chosen = torch.zeros(blocks, n, dtype=torch.bool).scatter_(1, mass.topk(k, -1).indices, True)
            keep = chosen.repeat_interleave(shared, 0)[:n]
        keep &= dom
    j = torch.arange(n)[None, :]
    causal = j <= rows[:, None]
    exact = keep | (causal & ((j < sinks) | (j > rows[:, None] - window)))
    weights = exact.double()
    rest = dom & ~keep
    count = rest.sum(-1)
    live = count > 0
    if sample_size and live.any():
        draws = torch.multinomial(rest[live].double(), sample_size, replacement=True, generator=generator)
        each = (count[live].double() / sample_size)[:, None].expand(-1, sample_size)
        weights[live] = weights[live].scatter_add(1, draws, each)
    return weights.log()


# ----------------------------------------------------------------------------------------------------------
# capture (cached)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """Q/K/V records of one prompt, and for a passkey prompt the needle's key span and the answering rows."""

    name: str
    records: list
    needle_span: tuple[int, int] | None = None
    needle_rows: tuple[int, ...] = ()


def capture_path(prompt: str, seq: int, offset: int, depth: float, layers: str) -> str:
    where = f"o{offset}" if prompt == "kjv" else f"d{depth}"
    return os.path.join(CACHE, f"{prompt}_{seq}_{where}_l{layers.replace(',', '-')}.pt")


def capture(prompt: str, seq: int, offset: int, depth: float, layers: str, console: Console) -> Capture:
    """The cached capture of ``prompt`` (``kjv`` or ``passkey``), made with one exact forward when absent."""
    path = capture_path(prompt, seq, offset, depth, layers)
    if not os.path.exists(path):
        from hyper_backend.autotune import models
        from hyper_backend.capture import capture_attention
        from hyper_backend.needles import build, repeat_filler

        model, tok = models.load_model(models.model_path(models.DEFAULT_MODEL))
        body = models.body_and_head(model)[0]
        bos = tok.bos_token_id
        meta = {}
        if prompt == "kjv":
            text = models.text_tokens(tok, models.kjv_text(), seq - 1, offset=offset)
            ids = models.windows(text, seq, bos)[:1]
        else:
            tokenize = lambda t: tok(t, add_special_tokens=False)["input_ids"]
            filler = repeat_filler(tokenize, lambda i: tok.decode([i]), seq)
            p = build("passkey", seq, depth, 0, filler, tokenize, bos)
            # the needle line of needles.build's passkey prompt, tokenized as it was inserted
            line = f" The pass key is {p.values[0]}. Remember it. {p.values[0]} is the pass key."
            start = p.needles[0]
            meta = {
                "needle_span": (start, start + len(tokenize(line))),
                "needle_rows": tuple(range(len(p.ids) - 1, seq - 1)),
            }
            ids = torch.tensor([list(p.ids) + list(p.answer)])
        t0 = time.perf_counter()
        with torch.no_grad(), capture_attention(layers, module=body) as records:
            body(input_ids=ids)
        console.print(f"captured {prompt} layers {layers} at n={seq} in {time.perf_counter() - t0:.0f} s -> {path}")
        os.makedirs(CACHE, exist_ok=True)
        torch.save({"records": list(records), **meta}, path)
    data = torch.load(path, weights_only=True)
    span = data.get("needle_span")
    return Capture(prompt, data["records"], tuple(span) if span else None, tuple(data.get("needle_rows", ())))


# ----------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------


def evaluate(cap: Capture, rows: list[Row], heads: Sequence[int] | None, r0: int, console: Console) -> dict:
    """``{row name: [per (layer, head) metrics]}`` over the capture's records."""
    per: dict[str, list] = {r.name: [] for r in rows}
    with torch.no_grad():
        for rec in cap.records:
            t0 = time.perf_counter()
            q, k, v, scale = rec["q"], rec["k"], rec["v"], rec["scale"]
            hq, hkv = q.shape[1], k.shape[1]
            chosen = list(range(hq)) if heads is None else [h for h in heads if h < hq]
            exact = {}
            for h in chosen:
                qh, kh, vh = q[0, h], k[0, h // (hq // hkv)], v[0, h // (hq // hkv)]
                needle = (cap.needle_rows, cap.needle_span) if cap.needle_span else None
                s, p = exact_probs(qh, kh, scale)
                exact[h] = make_head(s, p, vh, r0, needle)
                del s
                for r in rows:
                    if r.kind == "op":
                        continue
                    g = torch.Generator().manual_seed(1000 * rec["layer"] + h)
                    shared = 1 if r.kind == "flat" else QUERY_BLOCK
                    logw = oracle_log_weights(p, r.top_k, r.sample_size, shared, g)
                    per[r.name].append({"layer": rec["layer"], "head": h, **metrics(exact[h], logw)})
                del p
            for r in rows:
                if r.kind != "op":
                    continue
                logw = log_weights(q, k, None, True, r.config, v=v, scale=scale)[0]
                for h in chosen:
                    per[r.name].append({"layer": rec["layer"], "head": h, **metrics(exact[h], logw[h])})
                del logw
            console.print(
                f"  {cap.name}: layer {rec['layer']} ({len(chosen)} heads) in {time.perf_counter() - t0:.0f} s"
            )
    return per


def summarize(row: Row, cells: list[dict]) -> dict:
    out = {k: sum(c[k] for c in cells) / len(cells) for k in ("error", "recall", "keys")}
    if cells and "needle_mass" in cells[0]:
        out["needle"] = sum(c["needle_kept"] for c in cells) / max(sum(c["needle_mass"] for c in cells), 1e-300)
    return out


def oracle_at(points: list[tuple[float, float]], keys: float) -> float:
    """The flat oracle's error at ``keys`` per query: piecewise linear in log(keys) between its points, constant
    beyond its ends."""
    points = sorted(points)
    if keys <= points[0][0]:
        return points[0][1]
    for (k0, e0), (k1, e1) in zip(points, points[1:]):
        if keys <= k1:
            t = (math.log(keys) - math.log(k0)) / (math.log(k1) - math.log(k0))
            return e0 + t * (e1 - e0)
    return points[-1][1]


def time_rows(cap: Capture, rows: list[Row], repeats: int) -> dict:
    """``{row name: op time / exact SDPA time}`` on the first record, interleaved; plus the load and raw times."""
    rec = cap.records[0]
    q, k, v, scale = rec["q"], rec["k"], rec["v"], rec["scale"]
    ops = [r for r in rows if r.kind == "op"]
    fns = {"exact": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)}
    for r in ops:
        fns[r.name] = lambda c=r.config: hyper_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True, config=c
        )
    load = [os.getloadavg()]
    with torch.no_grad():
        times = interleave(fns, repeats)
    load.append(os.getloadavg())
    ratio = {r.name: times[r.name]["median"] / times["exact"]["median"] for r in ops}
    return {"ratio": ratio, "times": times, "load": load, "layer": rec["layer"]}


def table(name: str, summary: dict, rows: list[Row], costs: dict, timing: dict | None) -> Table:
    title = f"{name}: rows >= r0, mean over layers and heads"
    t = Table(title=title)
    for col in ("detector", "keys/query", "row error", "vs oracle", "recall@32", "needle", "cost", "time"):
        t.add_column(col, justify="left" if col == "detector" else "right")
    for r in rows:
        s = summary[r.name]
        t.add_row(
            r.name,
            f"{s['keys']:.0f}",
            f"{s['error']:.4f}",
            f"{s['vs_oracle']:+.4f}",
            f"{s['recall']:.3f}",
            f"{s['needle']:.3f}" if "needle" in s else "-",
            f"{costs[r.name]:.4f}" if r.name in costs else "-",
            f"{timing['ratio'][r.name]:.3f}" if timing and r.name in timing["ratio"] else "-",
        )
    return t


def plot(results: dict, rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = list(results)
    fig, axes = plt.subplots(len(caps), 2, figsize=(15, 4.2 * len(caps)), squeeze=False)
    for ax_row, cap in zip(axes, caps):
        summary = results[cap]["summary"]
        for ax, metric in zip(ax_row, ("error", "recall")):
            for kind, style in (("flat", "k-o"), ("block", "k--s")):
                pts = sorted((summary[r.name]["keys"], summary[r.name][metric]) for r in rows if r.kind == kind)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{kind} oracle (K={', '.join(map(str, ORACLE_K))})", ms=5)
            markers = iter("ovD^<>phX*P")
            for r in rows:
                if r.kind == "op":
                    s = summary[r.name]
                    ax.plot(s["keys"], s[metric], next(markers), ms=7, label=r.name)
            target, what = TARGETS[metric]
            ax.axhline(target, color="tab:red", lw=0.8, ls=":", label=f"target: {what}")
            ax.set_xscale("log")
            ax.set_xlabel("keys per query (mean over all rows)")
            ax.set_ylabel("mean row error" if metric == "error" else f"recall of the top-{TOP} mass")
            ax.set_title(f"{cap}: {'row error' if metric == 'error' else 'recall'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int] | None:
    return None if text in ("", "all") else [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--offset", type=int, default=100000, help="KJV token offset")
    p.add_argument("--depth", type=float, default=0.25, help="passkey needle depth")
    p.add_argument("--layers", default="5,11,17", help="captured layers (Gemma-3-270m's global ones)")
    p.add_argument("--heads", default="all", help="query heads per layer, e.g. 0,2")
    p.add_argument("--prompts", type=lambda t: t.split(","), default=list(PROMPTS), help="kjv,passkey")
    p.add_argument("--rows-from", type=int, default=4096, help="error and recall over rows >= this")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (0: no timing)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/detectors_<seq>.json)")
    p.add_argument(
        "--configs",
        nargs="*",
        default=(),
        metavar="FIELD=V,...",
        help="topk rows to measure instead of the default op rows (fields over topk's defaults); oracles stay",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    console = Console(width=150)
    rows = default_rows(args.configs)
    out = args.out or os.path.join(RESULTS, f"detectors_{args.seq}.json")
    results = {}
    for prompt in args.prompts:
        cap = capture(prompt, args.seq, args.offset, args.depth, args.layers, console)
        rec = cap.records[0]
        group = rec["q"].shape[1] // rec["k"].shape[1]
        costs = {r.name: detector_cost(r.config, args.seq, group) for r in rows if r.kind == "op"}
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        per = evaluate(cap, rows, _ints(args.heads), args.rows_from, console)
        summary = {r.name: summarize(r, per[r.name]) for r in rows}
        oracle = [(summary[r.name]["keys"], summary[r.name]["error"]) for r in rows if r.kind == "flat"]
        for s in summary.values():
            s["vs_oracle"] = s["error"] - oracle_at(oracle, s["keys"])
        timing = time_rows(cap, rows, args.repeats) if args.repeats and not results else None  # same shapes
        console.print(table(cap.name, summary, rows, costs, timing))
        console.print(
            f"load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f} over {time.perf_counter() - t0:.0f} s"
            + (f"; timing at load {timing['load'][0][0]:.2f} -> {timing['load'][1][0]:.2f}" if timing else "")
        )
        results[prompt] = {
            "summary": summary,
            "cost": costs,
            "timing": timing,
            "per_head": per,
            "load": [load0, os.getloadavg()],
            "needle_span": cap.needle_span,
            "needle_rows": list(cap.needle_rows),
        }
    payload = {
        "device": device_stamp(),
        "args": vars(args),
        "rows": [
            {"name": r.name, "kind": r.kind, "config": repr(r.config), "top_k": r.top_k, "sample_size": r.sample_size}
            for r in rows
        ],
        "results": results,
    }
    write_json(out, payload)
    plot(results, rows, os.path.splitext(out)[0] + ".png")
    console.print(f"wrote {out} and {os.path.splitext(out)[0]}.png")
    return payload


if __name__ == "__main__":
    main()
