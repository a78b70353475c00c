"""The ``"topk"`` detector: positional query blocks that attend exactly to the keys scoring highest for them.

A ``"topk"`` part (`plan.Part`) splits the queries into blocks of ``block`` rows. Block ``c`` (rows
``lo = c * block`` on) keeps exact:

* its **tile**: ``T`` consecutive keys from ``L0``. Causal: ``L0 = lo + (n_k - n_q) - strip``, ``T = block +
  strip``, row i seeing tile key j iff ``j <= i + n_k - n_q`` (so every query keeps its ``w`` most recent keys).
  Non-causal with a window ``(a, b)``: ``L0 = lo - a``, ``T = block + a + b`` (the union of its rows' windows).
  Non-causal without one: no tile.
* its **sinks**: the call's first ``sink_keys`` valid keys, where the tile does not hold them;
* its **top-k**: the ``top_k`` keys of its *domain* (the valid keys before the tile, causal; outside it,
  non-causal; the sinks excepted) with the highest detector score. The score of key j is
  ``max_r (scale * rep_r . k_j - lse_r)`` over the block's representatives ``rep_r`` (the means of its
  consecutive groups of ``score_group`` queries), ``lse_r`` the log-sum-exp of ``rep_r``'s scores over the domain;
* a **residual**: ``m = sample_size`` draws over the domain's remaining keys, with probability ``q(x)``, each
  weighted ``1 / (m q(x))``, so that the estimate of the remaining keys' softmax mass is unbiased. Draws pick a
  cell of `CELL` consecutive keys in proportion to ``exp(max over its remaining keys of h)``, then a key of the
  cell uniformly (``q(x) = p_cell / CELL``); a draw that lands on a key outside the remaining ones counts 0.
  ``h`` is the detector score (``residual="importance"``), 0 (``"uniform"``), or ``log |v_j|^2`` (``"vnorm"``,
  the paper's AMM step).

No key is counted twice: the tile, the sinks, the top-k and the residual's keys are disjoint for every block.
`select` computes the choices once (`Selection`); `attend` executes them (plain torch, any device, autograd
through it) and `dense_log_weights` writes them as the reference's log-weight matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .plan import Part

CELL = 16  # keys per residual draw cell
_BUDGET = 1 << 23  # elements of the largest temporary per chunk of blocks


class Selection(NamedTuple):
    """Each block's side keys (sinks, top-k, residual draws): positions ``pos [B, Hq, nb, E]`` (long) and log
    weights ``lw [B, Hq, nb, E]`` (float32; 0 exact, ``-log(m q)`` a draw, -inf an unused slot)."""

    pos: torch.Tensor
    lw: torch.Tensor


def blocks(part: Part, n_q: int) -> int:
    return math.ceil(n_q / part.block)


def tile(part: Part, n_q: int, n_k: int, first: int, count: int, device):
    """Blocks ``first .. first + count - 1``'s tile: ``(idx [count, T]`` key positions (clamped into range),
    ``vis [count, block, T]`` bool: row r of the block sees tile slot t), and their domains' bounds
    ``(lo [count], hi [count])``: the domain is ``j < lo`` or ``j >= hi``."""
    c = torch.arange(first, first + count, device=device)
    rows = c[:, None] * part.block + torch.arange(part.block, device=device)  # [count, block]
    if part.causal:
        off = n_k - n_q
        start, T = c * part.block + off - part.strip, part.block + part.strip
    elif part.window is not None:
        a, b = part.window
        start, T = c * part.block - a, part.block + a + b
    else:
        start, T = c * part.block, 0
    idx = start[:, None] + torch.arange(T, device=device)  # [count, T]
    vis = ((idx >= 0) & (idx < n_k))[:, None, :] & (rows < n_q)[:, :, None]
    if part.causal:
        vis = vis & (idx[:, None, :] <= rows[:, :, None] + (n_k - n_q))
    lo = start.clamp(0, n_k)
    hi = (start + T).clamp(0, n_k) if not part.causal else torch.full_like(lo, n_k)
    return idx.clamp(0, max(n_k - 1, 0)), vis, lo, hi


def _domain(lo, hi, est, n_k: int) -> torch.Tensor:
    """``[B, count, n_k]`` bool: the blocks' domains among the estimator's keys ``est [B, n_k]``."""
    j = torch.arange(n_k, device=lo.device)
    inside = (j[None, :] < lo[:, None]) | (j[None, :] >= hi[:, None])
    return inside[None] & est[:, None, :]


def _reps(q: torch.Tensor, part: Part, n_q: int, first: int, count: int, group: int):
    """``([B, Hq, count, R, D]`` float32 representatives, ``ok [count, R]``): the means of each block's
    groups of ``group`` rows (padding rows excluded)."""
    B, Hq, _, D = q.shape
    R = math.ceil(part.block / group)
    within = torch.arange(R * group, device=q.device).view(R, group)  # [R, group]: the row inside its block
    rows = (first + torch.arange(count, device=q.device))[:, None, None] * part.block + within
    real = (rows < n_q) & (within < part.block)  # [count, R, group]
    local = rows.clamp(max=max(n_q - 1, 0))
    x = q[:, :, local.reshape(-1)].float().view(B, Hq, count, R, group, D)
    x = x * real[None, None, ..., None]
    n = real.sum(-1)  # [count, R]
    return x.sum(-2) / n.clamp_min(1)[None, None, ..., None], n > 0


def _sinks(sink: torch.Tensor | None, count: int):
    """``(pos [B, s], ok [B, s])`` of the call's sinks, or None."""
    if sink is None:
        return None
    s = int(sink.sum(-1).max().item()) if sink.numel() else 0
    if not s:
        return None
    pos = torch.argsort((~sink).to(torch.int8), dim=-1, stable=True)[:, :s]
    return pos, torch.gather(sink, 1, pos)


def select(q, k, v, valid, sink, part: Part, scale: float, p) -> Selection:
    """The side keys of every block (see the module docstring). ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``,
    ``valid [B, Nk]`` bool or None, ``sink [B, Nk]`` bool or None, ``p`` the fitted `HyperConfig`."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    nb = blocks(part, n_q)
    est = torch.ones(B, n_k, dtype=torch.bool, device=dev) if valid is None else valid
    if sink is not None:
        est = est & ~sink
    sinks = _sinks(sink, nb)
    R = math.ceil(part.block / p.score_group)
    K, m = min(p.top_k, n_k), p.sample_size
    kf = k.float()
    hv = None
    if p.residual_scheme == "vnorm":
        hv = (v.float() ** 2).sum(-1).clamp_min(1e-30).log()  # [B, Hkv, Nk]
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(p.seed) * 1_000_003 + part.stream + 7)
    per = max(1, _BUDGET // max(1, B * Hq * R * n_k))
    out_pos, out_lw = [], []
    for first in range(0, nb, per):
        count = min(per, nb - first)
        _, _, lo, hi = tile(part, n_q, n_k, first, count, dev)
        width = n_k  # causal: the keys before the chunk's last tile are all its blocks may select
        if part.causal:
            last = (first + count - 1) * part.block + (n_k - n_q) - part.strip
            width = min(n_k, max(last, K, 1))
        dom = _domain(lo, hi, est[:, :width], width)  # [B, count, width]
        reps, rep_ok = _reps(q, part, n_q, first, count, p.score_group)
        sc = reps.view(B, Hkv, group * count * R, D) @ kf[:, :, :width].transpose(-1, -2)
        sc = (sc * scale).view(B, Hq, count, R, width).masked_fill(~dom[:, None, :, None, :], -math.inf)
        lse = torch.logsumexp(sc, -1, keepdim=True)
        sc = (sc - torch.where(torch.isfinite(lse), lse, 0.0)).masked_fill(~rep_ok[None, None, :, :, None], -math.inf)
        score = sc.amax(3)  # [B, Hq, count, n_k]
        del sc
        parts_pos, parts_lw = [], []
        if sinks is not None:
            spos, sok = sinks
            sp = spos[:, None, :]  # [B, 1, s]
            keep = sok[:, None, :] & ((sp < lo[None, :, None]) | (sp >= hi[None, :, None]))  # [B, count, s]
            parts_pos.append(sp.expand(B, count, -1)[:, None].expand(B, Hq, count, -1))
            parts_lw.append(torch.where(keep, 0.0, -math.inf)[:, None].expand(B, Hq, count, -1))
        top, top_pos = score.topk(K, -1, sorted=False) if K else (score[..., :0], score[..., :0].long())
        parts_pos.append(top_pos)
        parts_lw.append(torch.where(torch.isfinite(top), 0.0, -math.inf))
        if m:
            rest = score.scatter(-1, top_pos, -math.inf)
            dpos, dlw = _draw(rest, None if hv is None else hv[..., :width], p.residual_scheme, m, group, gen)
            parts_pos.append(dpos)
            parts_lw.append(dlw)
        out_pos.append(torch.cat(parts_pos, -1))
        out_lw.append(torch.cat(parts_lw, -1).float())
    return Selection(torch.cat(out_pos, 2).contiguous(), torch.cat(out_lw, 2).contiguous())


def _draw(rest, hv, scheme: str, m: int, group: int, gen):
    """``m`` residual draws per block over the keys where ``rest [B, Hq, count, Nk]`` is finite."""
    B, Hq, count, n_k = rest.shape
    left = torch.isfinite(rest)
    if scheme == "importance":
        h = rest
    elif scheme == "vnorm":
        h = hv.repeat_interleave(group, 1)[:, :, None, :].masked_fill(~left, -math.inf)
    else:
        h = torch.zeros_like(rest).masked_fill(~left, -math.inf)
    cells = math.ceil(n_k / CELL)
    h = torch.nn.functional.pad(h, (0, cells * CELL - n_k), value=-math.inf).view(B, Hq, count, cells, CELL)
    top = h.amax(-1)  # [B, Hq, count, cells]
    empty = torch.isneginf(top).all(-1, keepdim=True)
    logp = torch.log_softmax(torch.where(empty, 0.0, top), -1)  # an empty row draws anything and keeps nothing
    cell = torch.multinomial(logp.exp().view(-1, cells), m, replacement=True, generator=gen).view(B, Hq, count, m)
    at = torch.randint(0, CELL, (B, Hq, count, m), generator=gen, device=rest.device)
    pos = (cell * CELL + at).clamp(max=n_k - 1)
    ok = (cell * CELL + at < n_k) & left.gather(-1, pos) & ~empty
    lw = math.log(CELL / m) - logp.gather(-1, cell)
    return pos, torch.where(ok, lw, -math.inf)


class _Chunk(NamedTuple):
    """One chunk of blocks: its queries ``[B, Hkv, g, count, qb, D]``, side and tile keys and values, their
    positions and the scores ``s [B, Hkv, g, count, qb, E + T]`` (-inf where not attended)."""

    first: int
    q: torch.Tensor
    k: torch.Tensor  # [B, Hkv, g, count, E + T, D]
    v: torch.Tensor
    pos: torch.Tensor  # [B, Hkv, g * count * E] side positions
    idx: torch.Tensor | None  # [count, T] tile positions
    s: torch.Tensor


def _chunks(q, k, v, valid, sel: Selection, part: Part, scale: float):
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nb, qb = blocks(part, n_q), part.block
    qp = torch.nn.functional.pad(q, (0, 0, 0, nb * qb - n_q)).to(acc).view(B, Hkv, group, nb, qb, D)
    kf, vf = k.to(acc), v.to(acc)
    E = sel.pos.shape[-1]
    T = part.block + part.strip if part.causal else (part.block + sum(part.window) if part.window else 0)
    per = max(1, _BUDGET // max(1, B * Hq * (E + T) * max(qb, D)))
    for first in range(0, nb, per):
        count = min(per, nb - first)
        qc = qp[:, :, :, first : first + count]  # [B, Hkv, g, count, qb, D]
        pos = sel.pos[:, :, first : first + count].reshape(B, Hkv, -1)
        at = pos[..., None].expand(-1, -1, -1, D)
        ks = kf.gather(2, at).view(B, Hkv, group, count, E, D)
        vs = vf.gather(2, at).view(B, Hkv, group, count, E, D)
        lw = sel.lw[:, :, first : first + count].reshape(B, Hkv, group, count, 1, E)
        idx = None
        if T:
            idx, vis, _, _ = tile(part, n_q, n_k, first, count, q.device)
            kt = kf[:, :, idx][:, :, None].expand(-1, -1, group, -1, -1, -1)  # [B, Hkv, g, count, T, D]
            vt = vf[:, :, idx][:, :, None].expand(-1, -1, group, -1, -1, -1)
            keep = vis[None] if valid is None else vis[None] & valid[:, idx][:, :, None, :]  # [B, count, qb, T]
            bias = torch.zeros(keep.shape, dtype=acc, device=q.device).masked_fill(~keep, -math.inf)
            ks, vs = torch.cat([ks, kt], -2), torch.cat([vs, vt], -2)
            bias = bias[:, None, None].expand(-1, Hkv, group, -1, -1, -1)
            lw = torch.cat([lw.expand(-1, -1, -1, -1, qb, -1), bias], -1)
        yield _Chunk(first, qc, ks, vs, pos, idx, (qc @ ks.transpose(-1, -2)) * scale + lw)


def _probs(s):
    lse = torch.logsumexp(s, -1, keepdim=True)
    return torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)), lse.squeeze(-1)


def attend(q, k, v, valid, sel: Selection, part: Part, scale: float):
    """``(out [B, Hq, Nq, D]`` in q's dtype, ``lse [B, Hq, Nq]``): each block's rows attend to their tile and their
    side keys ``sel`` in one softmax (float32 accumulation, float64 for float64 inputs)."""
    B, Hq, n_q, D = q.shape
    outs, lses = [], []
    for c in _chunks(q, k, v, valid, sel, part, scale):
        prob, lse = _probs(c.s)
        outs.append(prob @ c.v)
        lses.append(lse)
    out = torch.cat(outs, 3).reshape(B, Hq, -1, D)[:, :, :n_q]
    lse = torch.cat(lses, 3).reshape(B, Hq, -1)[:, :, :n_q]
    return out.to(q.dtype), lse


def attend_backward(q, k, v, valid, sel: Selection, part: Part, scale: float, do, out):
    """``(dq, dk, dv)`` of `attend` for a fixed selection, given the gradient ``do`` and the output ``out``."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    nb, qb = blocks(part, n_q), part.block
    E = sel.pos.shape[-1]
    shape = (B, Hkv, group, nb, qb, D)
    pad = lambda x: torch.nn.functional.pad(x.to(acc), (0, 0, 0, nb * qb - n_q)).view(shape)  # noqa: E731
    dop = pad(do)
    delta = (dop * pad(out)).sum(-1, keepdim=True)  # [B, Hkv, g, nb, qb, 1]
    dq = torch.zeros(shape, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, n_k, D, dtype=acc, device=q.device)
    dv = torch.zeros_like(dk)
    for c in _chunks(q, k, v, valid, sel, part, scale):
        rows = slice(c.first, c.first + c.s.shape[3])
        prob, _ = _probs(c.s)
        g = dop[:, :, :, rows]
        ds = prob * (g @ c.v.transpose(-1, -2) - delta[:, :, :, rows]) * scale
        dq[:, :, :, rows] = ds @ c.k
        gk, gv = ds.transpose(-1, -2) @ c.q, prob.transpose(-1, -2) @ g  # [B, Hkv, g, count, E + T, D]
        count = c.s.shape[3]
        at = c.pos[..., None].expand(-1, -1, -1, D)
        dk.scatter_add_(2, at, gk[..., :E, :].reshape(B, Hkv, -1, D))
        dv.scatter_add_(2, at, gv[..., :E, :].reshape(B, Hkv, -1, D))
        if c.idx is not None:
            flat = c.idx.reshape(-1)
            dk.index_add_(2, flat, gk[..., E:, :].sum(2).reshape(B, Hkv, count * c.idx.shape[1], D))
            dv.index_add_(2, flat, gv[..., E:, :].sum(2).reshape(B, Hkv, count * c.idx.shape[1], D))
    dq = dq.view(B, Hq, nb * qb, D)[:, :, :n_q]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype), dv.to(v.dtype)


def dense_log_weights(sel: Selection, part: Part, n_q: int, n_k: int, valid, device) -> torch.Tensor:
    """``[B, Hq, Nq, Nk]`` float64 weights of a ``"topk"`` part: 1 on the tile and the exact side keys, the sum
    of the draws' weights on a drawn key, 0 elsewhere."""
    B, Hq, nb, _ = sel.pos.shape
    side = torch.zeros(B, Hq, nb, n_k, dtype=torch.float64, device=device)
    side.scatter_add_(-1, sel.pos, sel.lw.double().exp())
    w = side.repeat_interleave(part.block, 2)[:, :, :n_q].clone()
    idx, vis, _, _ = tile(part, n_q, n_k, 0, nb, device)
    if idx.shape[-1]:
        rows = torch.arange(nb * part.block, device=device).view(nb, part.block, 1).expand_as(vis)
        cols = idx[:, None, :].expand_as(vis)
        keep = vis if valid is None else vis[None] & valid[:, cols]
        keep = keep.expand(B, *vis.shape) if keep.dim() == 3 else keep
        for b in range(B):
            r, c = rows[keep[b]], cols[keep[b]]
            w[b, :, r, c] = 1.0
    return w


def _inputs(plan, q, k, v, key_valid, scale):
    from .parts import call_sinks

    part = plan.parts[0]
    sink = call_sinks(plan, key_valid, q.shape[0], q.device)
    with torch.no_grad():
        return part, select(q, k, v, key_valid, sink, part, scale, plan.config)


def call_forward(plan, q, k, v, key_valid, scale):
    """``(out, lse)`` of a call whose plan is one ``"topk"`` part (contiguous; lse float32, float64 for float64)."""
    part, sel = _inputs(plan, q, k, v, key_valid, scale)
    with torch.no_grad():
        out, lse = attend(q, k, v, key_valid, sel, part, scale)
    return out.contiguous(), lse.contiguous()


def call_backward(plan, do, q, k, v, out, key_valid, scale):
    """``(dq, dk, dv)`` of `call_forward` given its output: the same selection (recomputed: a function of the
    inputs and the seed), differentiated through `attend` with the selection fixed."""
    part, sel = _inputs(plan, q, k, v, key_valid, scale)
    return attend_backward(q, k, v, key_valid, sel, part, scale, do, out)
