"""The ``"topk"`` detector: positional query blocks that attend exactly to the keys scoring highest for them.

A ``"topk"`` part (`plan.Part`) splits the queries into blocks of ``block`` rows, aligned to end at the last
query (the first block may be partial: `lead` padding rows). Causal: the last block attends exactly to every key
it sees (`_tail`: its rows produce the next token, for ``block x n_k`` scores). Block ``c`` (first row
``lo = c * block - lead``) keeps exact:

* its **tile**: ``T`` consecutive keys from ``L0``. Causal: ``L0 = lo + (n_k - n_q) - strip``, ``T = block +
  strip``, row i seeing tile key j iff ``j <= i + n_k - n_q`` (so every query keeps its ``w`` most recent keys).
  Non-causal with a window ``(a, b)``: ``L0 = lo - a``, ``T = block + a + b`` (the union of its rows' windows).
  Non-causal without one: no tile.
* its **sinks**: the call's first ``sink_keys`` valid keys, where the tile does not hold them;
* its **top-k**: the ``top_k`` keys of its *domain* (the valid keys before the tile, causal; outside it,
  non-causal; the sinks excepted) with the highest detector score. The score of key j is
  ``max_r (scale * rep_r . k_j - lse_r)`` over the block's representatives ``rep_r`` (the means of its
  consecutive groups of ``score_group`` queries), ``lse_r`` the log-sum-exp of ``rep_r``'s scores over the domain
  (estimated on every `STRIDE`-th key). The products are taken on bfloat16-rounded operands (`rank_dtype`): the
  ranking is a heuristic, and every weight below stays consistent with the keys it chose;
* a **residual**: ``m = sample_size`` draws over the domain's remaining keys, with probability ``q(x)``, each
  weighted ``1 / (m q(x))``, so that the estimate of the remaining keys' softmax mass is unbiased. Draws pick a
  cell of `CELL` consecutive keys in proportion to ``exp(max over its remaining keys of h)``, then a key of the
  cell uniformly (``q(x) = p_cell / CELL``); a draw that lands on a key outside the remaining ones counts 0.
  ``h`` is the detector score (``residual="importance"``), 0 (``"uniform"``), or ``log |v_j|^2`` (``"vnorm"``,
  the paper's AMM step).

No key is counted twice: the tile, the sinks, the top-k and the residual's keys are disjoint for every block.
`select` computes the choices once (`Selection`); `attend` and `attend_backward` execute them (plain torch, any
device, in chunks of blocks whose gathered keys and scores reuse one set of buffers: fresh pages per chunk cost
more than the products) and `dense_log_weights` writes them as the reference's log-weight matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .cpu.threads import Threads
from .parts import call_sinks, first_marked
from .plan import Part

CELL = 16  # keys per residual draw cell
_BUDGET = 1 << 24  # elements of the largest temporary per chunk of blocks
_KEY_TILE = 4096  # keys scored at once by a chunk's representatives
_NATIVE = 1 << 24  # scores from which the detector's products run in bfloat16 (`rank_dtype`)


class Selection(NamedTuple):
    """Each block's side keys (sinks, top-k, residual draws): positions ``pos [B, Hq, nb, E]`` (long) and log
    weights ``lw [B, Hq, nb, E]`` (float32; 0 exact, ``-log(m q)`` a draw, -inf an unused slot)."""

    pos: torch.Tensor
    lw: torch.Tensor


def blocks(part: Part, n_q: int) -> int:
    return math.ceil(n_q / part.block)


def lead(part: Part, n_q: int) -> int:
    """Padding rows before the first query: blocks end at the last query, so the last block is always full."""
    return blocks(part, n_q) * part.block - n_q


def tile(part: Part, n_q: int, n_k: int, first: int, count: int, device):
    """Blocks ``first .. first + count - 1``'s tile: ``(idx [count, T]`` key positions (clamped into range),
    ``vis [count, block, T]`` bool: row r of the block sees tile slot t); `_bounds` gives their domains."""
    c = torch.arange(first, first + count, device=device) * part.block - lead(part, n_q)  # first rows
    rows = c[:, None] + torch.arange(part.block, device=device)  # [count, block]
    if part.causal:
        off = n_k - n_q
        start, T = c + off - part.strip, part.block + part.strip
    elif part.window is not None:
        a, b = part.window
        start, T = c - a, part.block + a + b
    else:
        start, T = c, 0
    idx = start[:, None] + torch.arange(T, device=device)  # [count, T]
    vis = ((idx >= 0) & (idx < n_k))[:, None, :] & (rows >= 0)[:, :, None]
    if part.causal:
        vis = vis & (idx[:, None, :] <= rows[:, :, None] + (n_k - n_q))
    return idx.clamp(0, max(n_k - 1, 0)), vis


def _bounds(part: Part, n_q: int, n_k: int, first: int, count: int, device):
    """The domains' bounds ``(lo [count], hi [count])`` of blocks ``first ..``: the domain is ``j < lo`` or
    ``j >= hi`` (the keys before the tile, causal; outside it, non-causal)."""
    c = torch.arange(first, first + count, device=device) * part.block - lead(part, n_q)
    if part.causal:
        return (c + (n_k - n_q) - part.strip).clamp(0, n_k), torch.full((count,), n_k, device=device)
    if part.window is not None:
        a, b = part.window
        return (c - a).clamp(0, n_k), (c + part.block + b).clamp(0, n_k)
    return c.clamp(0, n_k), c.clamp(0, n_k)


def _reps(q: torch.Tensor, part: Part, n_q: int, first: int, count: int, group: int):
    """``([B, Hq, count, R, D]`` float32 representatives, ``ok [count, R]``): the means of each block's
    groups of ``group`` rows (padding rows excluded)."""
    B, Hq, _, D = q.shape
    R = math.ceil(part.block / group)
    within = torch.arange(R * group, device=q.device).view(R, group)  # [R, group]: the row inside its block
    rows = (first + torch.arange(count, device=q.device))[:, None, None] * part.block + within - lead(part, n_q)
    real = (rows >= 0) & (within < part.block)  # [count, R, group]
    local = rows.clamp(0, max(n_q - 1, 0))
    x = q[:, :, local.reshape(-1)].float().view(B, Hq, count, R, group, D)
    x = x * real[None, None, ..., None]
    n = real.sum(-1)  # [count, R]
    return x.sum(-2) / n.clamp_min(1)[None, None, ..., None], n > 0


STRIDE = 16  # the log-sum-exp that normalises a representative's scores is estimated on every STRIDE-th key


SCORE = torch.bfloat16  # the detector ranks keys on bfloat16 operands, whatever the inputs' dtype


def rank_dtype(device: torch.device, scores: int) -> torch.dtype:
    """The dtype of the detector's products for ``scores`` of them: bfloat16 where they run natively (CUDA, CPUs
    with AVX512-BF16: about 2.5x the float32 rate here) and the call is large enough to gain from it, else
    float32 on the same bfloat16-rounded operands. The selection depends on the inputs' values, not on their
    dtype: a float32 call and its float64 reference keep the same keys."""
    native = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
    return SCORE if native and scores >= _NATIVE else torch.float32


def _score_keys(k, est, n_p: int, dtype) -> torch.Tensor:
    """``[B * Hkv, n_p, D + 3]`` `SCORE`-rounded, in ``dtype``: the keys, two 1 columns (that subtract a
    representative's log-sum-exp, split in two) and a bias column (0 on the estimator's keys, -inf elsewhere)."""
    B, Hkv, n_k, D = k.shape
    ka = torch.zeros(B, Hkv, n_p, D + 3, dtype=SCORE, device=k.device)
    ka[:, :, :n_k, :D] = k
    ka[..., D : D + 2] = 1
    ka[..., D + 2] = torch.where(est, 0.0, -math.inf)[:, None]
    return ka.view(B * Hkv, n_p, D + 3).to(dtype)


def _staircase(part: Part, n_q: int, n_k: int, first: int, count: int, width: int, lo, hi):
    """The columns ``[r0, r1)`` of a chunk's scores that some of its blocks must not select (their tiles and what
    follows, causal; the union of their windows, non-causal), and ``[count, r1 - r0]`` bool: the masked ones
    (``lo, hi``: the blocks' `_bounds`)."""
    c0 = first * part.block - lead(part, n_q)
    c1 = (first + count - 1) * part.block - lead(part, n_q)
    if part.causal:
        r0, r1 = c0 + (n_k - n_q) - part.strip, width
    elif part.window is not None:
        r0, r1 = c0 - part.window[0], c1 + part.block + part.window[1]
    else:
        r0 = r1 = 0
    r0, r1 = min(max(r0, 0), width), min(max(r1, 0), width)
    j = torch.arange(r0, r1, device=lo.device)
    return r0, r1, (j[None] >= lo[:, None]) & (j[None] < hi[:, None])


def select(q, k, v, valid, sink, part: Part, scale: float, p) -> Selection:
    """The side keys of every block (see the module docstring). ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``,
    ``valid [B, Nk]`` bool or None, ``sink [B, Nk]`` bool or None, ``p`` the fitted `HyperConfig`.

    Scores are products of `SCORE`-rounded operands (`rank_dtype`); a chunk's scores live in one buffer that
    every chunk reuses. The top-k is exact and costs two small selections: the `CELL`-key cells with the ``top_k``
    highest cell maxima hold every one of the top-k keys, so the keys are chosen among those cells' only."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    nb = blocks(part, n_q)
    n_p = math.ceil(n_k / CELL) * CELL  # keys padded to whole cells (padding is outside every domain)
    est = torch.ones(B, n_k, dtype=torch.bool, device=dev) if valid is None else valid
    if sink is not None:
        est = est & ~sink
    est = torch.nn.functional.pad(est, (0, n_p - n_k))
    sinks = None if sink is None else first_marked(sink, p.sink_keys)
    R = math.ceil(part.block / p.score_group)
    K, m = min(p.top_k, n_k), p.sample_size
    sd = rank_dtype(dev, B * Hq * nb * R * n_p)
    ka = _score_keys(k, est, n_p, sd)
    ka_s = ka[:, ::STRIDE].contiguous()  # the keys that the log-sum-exps are estimated on
    hv = None
    if p.residual_scheme == "vnorm":
        hv = torch.nn.functional.pad((v.float() ** 2).sum(-1).clamp_min(1e-30).log(), (0, n_p - n_k))
        hv = hv.view(B, Hkv, n_p // CELL, CELL).amax(-1).repeat_interleave(group, 1)[:, :, None]
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(p.seed) * 1_000_003 + part.stream + 7)
    per = max(1, _BUDGET // max(1, B * Hq * n_p))
    tile_keys = min(_KEY_TILE, n_p)
    rows = B * Hq * min(per, nb)
    score_buf = torch.empty(rows * n_p, device=dev)  # float32: the residual's bookkeeping scatters into it
    piece_buf = torch.empty(rows * R * tile_keys, dtype=sd, device=dev)
    max_buf = torch.empty(rows * tile_keys, dtype=sd, device=dev)
    cmax_buf = torch.empty(rows * (n_p // CELL), device=dev)
    out_pos, out_lw = [], []
    for first in range(0, nb, per):
        count = min(per, nb - first)
        lo, hi = _bounds(part, n_q, n_k, first, count, dev)
        width = n_p  # causal: the keys before the chunk's last tile are all its blocks may select
        if part.causal:
            last = (first + count - 1) * part.block - lead(part, n_q) + (n_k - n_q) - part.strip
            width = min(n_p, math.ceil(max(last, K, 1) / CELL) * CELL)
        r0, r1, stair = _staircase(part, n_q, n_k, first, count, width, lo, hi)
        reps, rep_ok = _reps(q, part, n_q, first, count, p.score_group)  # [B, Hq, count, R, D]
        aug = torch.zeros(B, Hq, count, R, D + 3, device=dev)
        aug[..., :D] = reps * scale
        aug[..., D + 2] = 1
        aug = aug.view(B * Hkv, group * count * R, D + 3)
        js = torch.arange(0, width, STRIDE, device=dev)
        out_dom = (js[None] >= lo[:, None]) & (js[None] < hi[:, None])  # [count, width / STRIDE]
        with Threads.parallel():
            sub = aug.to(SCORE).to(sd) @ ka_s[:, : -(-width // STRIDE)].transpose(-1, -2)
            sub = sub.float().view(B, Hq, count, R, -1)
            lse = _logsumexp_(sub.masked_fill_(out_dom[:, None], -math.inf)) + math.log(STRIDE)
        lse = torch.where(torch.isfinite(lse), lse, 0.0).masked_fill(~rep_ok, math.inf)  # [B, Hq, count, R]
        high = lse.to(SCORE).float()  # lse split in two columns: the product subtracts it at full precision
        cols = aug.view(B, Hq, count, R, D + 3)
        cols[..., D] = -high
        cols[..., D + 1] = torch.where(torch.isfinite(lse), high - lse, 0.0)
        aug = aug.to(SCORE).to(sd)
        score = score_buf[: B * Hq * count * width].view(B * Hq * count, width)
        cmax = cmax_buf[: B * Hq * count * (width // CELL)].view(B * Hq * count, width // CELL)
        for j in range(0, width, tile_keys):  # tiles of keys: the R-fold scores stay in cache
            end = min(j + tile_keys, width)
            piece = piece_buf[: B * Hq * count * R * (end - j)].view(B * Hkv, group * count * R, end - j)
            top = max_buf[: B * Hq * count * (end - j)].view(B * Hkv, group * count, end - j)
            with Threads.parallel():
                torch.bmm(aug, ka[:, j:end].transpose(-1, -2), out=piece)
            torch.amax(piece.view(B * Hkv, group * count, R, end - j), 2, out=top)
            score[:, j:end] = top.view(-1, end - j)
            cmax[:, j // CELL : end // CELL] = _cell_max(score[:, j:end])
        if r1 > r0:
            c0, c1 = r0 // CELL, -(-r1 // CELL)
            score[:, r0:r1].view(B, Hq, count, -1).masked_fill_(stair[None, None], -math.inf)
            cmax[:, c0:c1] = _cell_max(score[:, c0 * CELL : c1 * CELL])
        score, cmax = score.view(B, Hq, count, width), cmax.view(B, Hq, count, -1)
        parts_pos, parts_lw = [], []
        if sinks is not None:
            spos, sok = sinks
            sp = spos[:, None, :]  # [B, 1, s]
            keep = sok[:, None, :] & ((sp < lo[None, :, None]) | (sp >= hi[None, :, None]))  # [B, count, s]
            parts_pos.append(sp.expand(B, count, -1)[:, None].expand(B, Hq, count, -1))
            parts_lw.append(torch.where(keep, 0.0, -math.inf)[:, None].expand(B, Hq, count, -1))
        n_c = width // CELL
        kc = min(K, n_c)
        with Threads.parallel():
            top_cells = cmax.topk(kc, -1, sorted=False).indices if K else cmax[..., :0].long()
            flat = (top_cells + torch.arange(0, B * Hq * count * n_c, n_c, device=dev).view(B, Hq, count, 1)).view(-1)
            cand_score = score.view(-1, CELL).index_select(0, flat).view(B, Hq, count, kc * CELL)
            top, at = cand_score.topk(min(K, kc * CELL), -1, sorted=False)
        top_pos = top_cells.gather(-1, at // CELL) * CELL + at % CELL
        parts_pos.append(top_pos)
        parts_lw.append(torch.where(torch.isfinite(top), 0.0, -math.inf))
        if m:
            with Threads.parallel():
                score.scatter_(-1, top_pos, -math.inf)  # what remains for the residual
                left = _cell_max(cand_score.scatter_(-1, at, -math.inf).view(-1, kc * CELL))
                cmax.scatter_(-1, top_cells, left.view(top_cells.shape))
            cell_hv = None if hv is None else hv[..., :n_c]
            dpos, dlw = _draw(score, cmax, cell_hv, p.residual_scheme, m, gen)
            parts_pos.append(dpos)
            parts_lw.append(dlw)
        out_pos.append(torch.cat(parts_pos, -1))
        out_lw.append(torch.cat(parts_lw, -1).float())
    pos = torch.cat(out_pos, 2).clamp_(max=n_k - 1)  # a padding position is an unused slot (-inf)
    return Selection(pos.contiguous(), torch.cat(out_lw, 2).contiguous())


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1)``, overwriting ``x`` with its exponentials instead of allocating them."""
    top = x.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    return (x.sub_(top).exp_().sum(-1, keepdim=True).log() + top).squeeze(-1)


def _cell_max(x: torch.Tensor) -> torch.Tensor:
    """``[rows, W]`` -> ``[rows, W / CELL]``: the maximum of each cell of `CELL` consecutive columns (a pooling:
    about 4x ``amax`` over an inner dimension of 16 on the CPU)."""
    return torch.nn.functional.max_pool1d(x[:, None], CELL).view(x.shape[0], -1)


def _draw(rest, cmax, cell_hv, scheme: str, m: int, gen):
    """``m`` residual draws per block over the keys where ``rest [B, Hq, count, W]`` is finite, ``cmax`` its
    maxima per cell (-inf: a cell with no remaining key)."""
    width = rest.shape[-1]
    left = torch.isfinite(cmax)
    if scheme == "importance":
        h = cmax
    elif scheme == "vnorm":
        h = cell_hv.expand_as(cmax).masked_fill(~left, -math.inf)
    else:
        h = torch.zeros_like(cmax).masked_fill(~left, -math.inf)
    empty = ~left.any(-1, keepdim=True)
    u = torch.rand(*cmax.shape[:-1], m, generator=gen, device=rest.device, dtype=cmax.dtype)
    with Threads.parallel():
        logp = torch.log_softmax(torch.where(empty, 0.0, h), -1)  # an empty row draws anything and keeps nothing
        cdf = logp.exp().cumsum(-1)
        cell = torch.searchsorted(cdf, u.mul_(cdf[..., -1:])).clamp_(max=cmax.shape[-1] - 1)
    pos = cell * CELL + torch.randint(0, CELL, cell.shape, generator=gen, device=rest.device)
    pos = pos.clamp(max=width - 1)
    ok = torch.isfinite(rest.gather(-1, pos)) & ~empty
    lw = math.log(CELL / m) - logp.gather(-1, cell)
    return pos, torch.where(ok, lw, -math.inf)


_CHUNK = 1 << 21  # score elements per chunk of blocks in `attend`: a chunk's scores, keys and values stay in cache


class _Chunk(NamedTuple):
    """One chunk of ``C`` blocks (views into buffers that the next chunk overwrites). Layout ``[B, Hkv, C, g, ...]``
    (g: query heads per key head); ``BHC = B * Hkv * C``."""

    first: int
    q: torch.Tensor  # [B, Hkv, C, g, qb, D] queries, scaled
    ks: torch.Tensor  # [B * Hq * C, E, D] side keys
    vs: torch.Tensor
    rows: torch.Tensor  # [B * Hq * C * E] their rows in the flat [B * Hkv * n_k, D] keys
    ss: torch.Tensor  # [B * Hq * C, qb, E] side scores (log weights added)
    kt: torch.Tensor | None  # [BHC, T, D] tile keys (shared by the g heads)
    vt: torch.Tensor | None
    rows_t: torch.Tensor | None  # [BHC * T] their rows
    st: torch.Tensor | None  # [BHC, g * qb, T] tile scores


def _layout(x, B, Hkv, group, nb):
    """``[B, Hq, nb, ...]`` -> ``[B, Hkv, nb, g, ...]`` (contiguous)."""
    return x.reshape(B, Hkv, group, nb, *x.shape[3:]).transpose(2, 3).contiguous()


def _tile_width(part: Part) -> int:
    if part.causal:
        return part.block + part.strip
    return part.block + sum(part.window) if part.window else 0


def _per_chunk(part: Part, heads: int, E: int) -> int:
    return max(1, _CHUNK // max(1, heads * part.block * (E + _tile_width(part))))


class _Buffers:
    """Flat buffers of one call's largest chunk; ``take(name, *shape)`` views the first elements of one."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.flat = dtype, device, {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.flat.get(name)
        if buf is None or buf.numel() < n:
            buf = self.flat[name] = torch.empty(n, dtype=self.dtype, device=self.device)
        return buf[:n].view(*shape)


def _chunks(q, k, v, valid, sel: Selection, part: Part, scale: float, work: _Buffers):
    """The chunks of blocks of a call, each gathered and scored (see `_Chunk`)."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group = Hq // Hkv
    nb, qb, E, T = blocks(part, n_q), part.block, sel.pos.shape[-1], _tile_width(part)
    qp = torch.nn.functional.pad(q.to(work.dtype) * scale, (0, 0, lead(part, n_q), 0)).view(B, Hq, nb, qb, D)
    qp = _layout(qp, B, Hkv, group, nb)
    base = (torch.arange(B * Hkv, device=q.device) * n_k).view(B, Hkv, 1, 1, 1)  # each (batch, head)'s first row
    pos_all = _layout(sel.pos, B, Hkv, group, nb) + base
    lw_all = _layout(sel.lw, B, Hkv, group, nb).to(work.dtype)
    kf, vf = k.to(work.dtype).reshape(-1, D), v.to(work.dtype).reshape(-1, D)
    per = _per_chunk(part, B * Hq, E)
    for first in range(0, nb, per):
        C = min(per, nb - first)
        qc = qp[:, :, first : first + C]
        rows = pos_all[:, :, first : first + C].reshape(-1)
        with Threads.parallel():
            ks = torch.index_select(kf, 0, rows, out=work.take("ks", rows.numel(), D)).view(-1, E, D)
            vs = torch.index_select(vf, 0, rows, out=work.take("vs", rows.numel(), D)).view(-1, E, D)
            ss = torch.bmm(qc.reshape(-1, qb, D), ks.transpose(1, 2), out=work.take("ss", B * Hq * C, qb, E))
        ss.view(B, Hkv, C, group, qb, E).add_(lw_all[:, :, first : first + C, :, None])
        kt = vt = rows_t = st = None
        if T:
            idx, vis = tile(part, n_q, n_k, first, C, q.device)
            rows_t = (idx + base.view(B, Hkv, 1, 1)).reshape(-1)
            keep = vis[None] if valid is None else vis[None] & valid[:, idx][:, :, None, :]  # [B, C, qb, T]
            bias = torch.where(keep, 0.0, -math.inf).to(work.dtype)
            with Threads.parallel():
                kt = torch.index_select(kf, 0, rows_t, out=work.take("kt", rows_t.numel(), D)).view(-1, T, D)
                vt = torch.index_select(vf, 0, rows_t, out=work.take("vt", rows_t.numel(), D)).view(-1, T, D)
                st = torch.bmm(
                    qc.reshape(-1, group * qb, D), kt.transpose(1, 2), out=work.take("st", kt.shape[0], group * qb, T)
                )
            st.view(B, Hkv, C, group, qb, T).add_(bias[:, None, :, None])
        yield _Chunk(first, qc, ks, vs, rows, ss, kt, vt, rows_t, st)


def _exp(c: _Chunk, B, Hkv, group):
    """The chunk's scores exponentiated in place against each row's maximum: ``(inv, lse)`` per row
    ``[B, Hkv, C, g, qb, 1]``, ``inv`` the reciprocal of the row's total (0 for a row that sees no key)."""
    C, qb = c.q.shape[2], c.q.shape[4]
    ss = c.ss.view(B, Hkv, C, group, qb, -1)
    st = None if c.st is None else c.st.view(B, Hkv, C, group, qb, -1)
    top = ss.amax(-1, keepdim=True)
    if st is not None:
        top = torch.maximum(top, st.amax(-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = ss.sub_(top).exp_().sum(-1, keepdim=True)
    if st is not None:
        total = total + st.sub_(top).exp_().sum(-1, keepdim=True)
    return torch.where(total > 0, 1.0 / total, 0.0), top + total.log()


def _rows(x, B, Hq, n_q):
    """``[B, Hkv, nb, g, qb, ...]`` -> ``[B, Hq, n_q, ...]`` (the leading padding rows dropped)."""
    x = x.transpose(2, 3)
    x = x.reshape(B, Hq, -1, *x.shape[5:])
    return x[:, :, x.shape[2] - n_q :]


def _tail(q, k, v, valid, part: Part, scale: float):
    """Causal: the last block's rows attend exactly to every key they see (these rows produce the next token;
    ``block x n_k`` scores). ``(r0, p [B, Hkv, g, t, n_k], v [B, Hkv, 1, n_k, D], k, q rows)`` or None."""
    if not part.causal:
        return None
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    t = min(part.block, n_q)
    r0 = n_q - t
    qt = q[:, :, r0:].to(acc).reshape(B, Hkv, Hq // Hkv, t, D)
    kf, vf = k.to(acc)[:, :, None], v.to(acc)[:, :, None]
    i = torch.arange(r0, n_q, device=q.device)[:, None] + (n_k - n_q)
    keep = (torch.arange(n_k, device=q.device)[None, :] <= i)[None]  # [1, t, n_k]
    if valid is not None:
        keep = keep & valid[:, None, :]
    s = ((qt @ kf.transpose(-1, -2)) * scale).masked_fill(~keep[:, None, None], -math.inf)
    top = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(top), top, 0.0))
    total = e.sum(-1, keepdim=True)
    prob = e * torch.where(total > 0, 1.0 / total, 0.0)
    lse = (torch.where(torch.isfinite(top), top, 0.0) + total.log()).reshape(B, Hq, t)
    return r0, prob, kf, vf, qt, lse


def attend(q, k, v, valid, sel: Selection, part: Part, scale: float):
    """``(out [B, Hq, Nq, D]`` in q's dtype, ``lse [B, Hq, Nq]``): each block's rows attend to their tile and their
    side keys ``sel`` in one softmax (float32 accumulation, float64 for float64 inputs)."""
    B, Hq, n_q, D = q.shape
    Hkv = k.shape[1]
    group, nb, qb = Hq // Hkv, blocks(part, n_q), part.block
    work = _Buffers(torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)
    out = torch.empty(B, Hkv, nb, group, qb, D, dtype=work.dtype, device=q.device)
    lse = torch.empty(B, Hkv, nb, group, qb, dtype=work.dtype, device=q.device)
    for c in _chunks(q, k, v, valid, sel, part, scale, work):
        C = c.q.shape[2]
        inv, c_lse = _exp(c, B, Hkv, group)
        with Threads.parallel():
            o = torch.bmm(c.ss, c.vs, out=work.take("o", *c.ss.shape[:2], D))
            if c.st is not None:
                o.view(-1, group * qb, D).baddbmm_(c.st, c.vt)
        out[:, :, c.first : c.first + C] = o.view(B, Hkv, C, group, qb, D) * inv
        lse[:, :, c.first : c.first + C] = c_lse.squeeze(-1)
    out, lse = _rows(out, B, Hq, n_q), _rows(lse, B, Hq, n_q)
    tail = _tail(q, k, v, valid, part, scale)
    if tail is not None:
        r0, prob, _, vf, _, tail_lse = tail
        out[:, :, r0:] = (prob @ vf).reshape(B, Hq, -1, D)
        lse[:, :, r0:] = tail_lse
    return out.to(q.dtype), lse


def attend_backward(q, k, v, valid, sel: Selection, part: Part, scale: float, do, out):
    """``(dq, dk, dv)`` of `attend` for a fixed selection, given the gradient ``do`` and the output ``out``."""
    B, Hq, n_q, D = q.shape
    Hkv, n_k = k.shape[1], k.shape[2]
    group, nb, qb = Hq // Hkv, blocks(part, n_q), part.block
    work = _Buffers(torch.float64 if q.dtype == torch.float64 else torch.float32, q.device)

    def lay(x):
        x = torch.nn.functional.pad(x.to(work.dtype), (0, 0, lead(part, n_q), 0)).view(B, Hq, nb, qb, D)
        return _layout(x, B, Hkv, group, nb)

    tail = _tail(q, k, v, valid, part, scale)
    do_t = None
    if tail is not None:  # the last block's rows: exact, below; the blocks' path sees no gradient for them
        do_t = do[:, :, tail[0] :].to(work.dtype).reshape(B, Hkv, group, -1, D)
        do = do.clone()
        do[:, :, tail[0] :] = 0
    dop = lay(do)
    delta = (dop * lay(out)).sum(-1, keepdim=True)
    dq = torch.empty_like(dop)
    dk = torch.zeros(B * Hkv * n_k, D, dtype=work.dtype, device=q.device)
    dv = torch.zeros_like(dk)
    for c in _chunks(q, k, v, valid, sel, part, scale, work):
        C = c.q.shape[2]
        inv, _ = _exp(c, B, Hkv, group)
        sl = slice(c.first, c.first + C)
        rows6 = (B, Hkv, C, group, qb, -1)
        go, dl = dop[:, :, sl].reshape(-1, qb, D), delta[:, :, sl]
        ps = c.ss.view(rows6).mul_(inv).view_as(c.ss)
        with Threads.parallel():
            dss = torch.bmm(go, c.vs.transpose(1, 2), out=work.take("dss", *c.ss.shape))
        dss.view(rows6).sub_(dl).mul_(ps.view(rows6))
        with Threads.parallel():
            dqc = torch.bmm(dss, c.ks, out=work.take("dq", *go.shape))
            dks, dvs = torch.bmm(dss.transpose(1, 2), c.q.reshape(-1, qb, D)), torch.bmm(ps.transpose(1, 2), go)
        dk.index_add_(0, c.rows, dks.view(-1, D))
        dv.index_add_(0, c.rows, dvs.view(-1, D))
        if c.st is not None:
            pt = c.st.view(rows6).mul_(inv).view_as(c.st)
            gt = go.view(-1, group * qb, D)
            with Threads.parallel():
                dst = torch.bmm(gt, c.vt.transpose(1, 2), out=work.take("dst", *c.st.shape))
            dst.view(rows6).sub_(dl).mul_(pt.view(rows6))
            with Threads.parallel():
                dqc.view(-1, group * qb, D).baddbmm_(dst, c.kt)
                dkt = torch.bmm(dst.transpose(1, 2), c.q.reshape(-1, group * qb, D))
                dvt = torch.bmm(pt.transpose(1, 2), gt)
            dk.index_add_(0, c.rows_t, dkt.view(-1, D))
            dv.index_add_(0, c.rows_t, dvt.view(-1, D))
        dq[:, :, sl] = dqc.view(B, Hkv, C, group, qb, D) * scale
    dq = _rows(dq, B, Hq, n_q)
    dk, dv = dk.view(B, Hkv, n_k, D), dv.view(B, Hkv, n_k, D)
    if tail is not None:
        r0, prob, kf, vf, qt, _ = tail
        o_t = out[:, :, r0:].to(work.dtype).reshape(do_t.shape)
        ds = prob * (do_t @ vf.transpose(-1, -2) - (do_t * o_t).sum(-1, keepdim=True)) * scale
        dq = dq.clone()
        dq[:, :, r0:] = (ds @ kf).reshape(B, Hq, -1, D)
        dk += (ds.transpose(-1, -2) @ qt).sum(2)
        dv += (prob.transpose(-1, -2) @ do_t).sum(2)
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype), dv.to(v.dtype)


def dense_log_weights(sel: Selection, part: Part, n_q: int, n_k: int, valid, device) -> torch.Tensor:
    """``[B, Hq, Nq, Nk]`` float64 weights of a ``"topk"`` part: 1 on the tile and the exact side keys, the sum
    of the draws' weights on a drawn key, 0 elsewhere."""
    B, Hq, nb, _ = sel.pos.shape
    side = torch.zeros(B, Hq, nb, n_k, dtype=torch.float64, device=device)
    side.scatter_add_(-1, sel.pos, sel.lw.double().exp())
    w = side.repeat_interleave(part.block, 2)[:, :, lead(part, n_q) :].clone()
    idx, vis = tile(part, n_q, n_k, 0, nb, device)
    if idx.shape[-1]:
        rows = torch.arange(nb * part.block, device=device).view(nb, part.block, 1) - lead(part, n_q)
        rows = rows.expand_as(vis)
        cols = idx[:, None, :].expand_as(vis)
        keep = vis if valid is None else vis[None] & valid[:, cols]
        keep = keep.expand(B, *vis.shape) if keep.dim() == 3 else keep
        for b in range(B):
            r, c = rows[keep[b]], cols[keep[b]]
            w[b, :, r, c] = 1.0
    if part.causal:  # the last block is exact (`_tail`)
        r0 = n_q - min(part.block, n_q)
        i = torch.arange(r0, n_q, device=device)[:, None] + (n_k - n_q)
        seen = (torch.arange(n_k, device=device)[None, :] <= i).double()[None, None]
        w[:, :, r0:] = seen if valid is None else seen * valid[:, None, None, :]
    return w


def _inputs(plan, q, k, v, key_valid, scale):
    """The part, its selection and the scale (``None``: ``1 / sqrt(D)``)."""
    part = plan.parts[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sink = call_sinks(plan, key_valid, q.shape[0], q.device)
    with torch.no_grad():
        return part, select(q, k, v, key_valid, sink, part, scale, plan.config), scale


def call_forward(plan, q, k, v, key_valid, scale, serial: bool = True):
    """``(out, lse)`` of a call whose plan is one ``"topk"`` part (contiguous; lse float32, float64 for float64).
    ``serial``: on CPU, everything but the products, the gathers and the selection's passes over a whole chunk of
    blocks (its ranking and draws) runs on one thread (`Threads`)."""
    with Threads.serial(serial and q.device.type == "cpu"):
        part, sel, scale = _inputs(plan, q, k, v, key_valid, scale)
        with torch.no_grad():
            out, lse = attend(q, k, v, key_valid, sel, part, scale)
    return out.contiguous(), lse.contiguous()


def call_backward(plan, do, q, k, v, out, key_valid, scale, serial: bool = True):
    """``(dq, dk, dv)`` of `call_forward` given its output: the same selection (recomputed: a function of the
    inputs and the seed), differentiated through `attend` with the selection fixed."""
    with Threads.serial(serial and q.device.type == "cpu"):
        part, sel, scale = _inputs(plan, q, k, v, key_valid, scale)
        return attend_backward(q, k, v, key_valid, sel, part, scale, do, out)
