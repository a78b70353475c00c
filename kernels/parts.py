"""Tensor-level inputs of a `plan.CallPlan`'s parts, shared by every implementation.

A part addresses its operands through `sub_view` (the sub-problems of a part as a strided view, no copy). A
``"hyper"`` part's keys split into the estimator's keys and the exact extras (`exact_keys`: its sinks and its last
``strip`` keys), and its draws come from `hyper_inputs`: the reference, the CPU path and the Triton launcher all
call it, so they see the same sub-problems, the same extras and the same random choices.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyper_backend.config import HyperConfig

from .draws import Draws, draws_from_ranks, lsh_ranks
from .plan import CallPlan, Part


def sink_mask(key_valid: torch.Tensor | None, batch: int, n_k: int, sink_keys: int, device) -> torch.Tensor | None:
    """``[B, Nk]`` bool marking the first ``sink_keys`` valid keys of each batch row, or None when there are none."""
    if sink_keys <= 0 or n_k == 0:
        return None
    if key_valid is None:
        out = torch.zeros(batch, n_k, dtype=torch.bool, device=device)
        out[:, :sink_keys] = True
        return out
    return key_valid & (key_valid.cumsum(-1) <= sink_keys)


def first_marked(mask: torch.Tensor, most: int):
    """``(pos [B, s], ok [B, s])``: the positions of each row's marked entries of ``mask [B, N]`` in order, in
    ``s = min(most, N)`` slots (``most``: a bound on any row's count, known on the host, so that no device value is
    read back; ``ok`` false past a row's own count)."""
    s = min(most, mask.shape[-1])
    pos = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :s]
    return pos, torch.gather(mask, 1, pos)


def exact_keys(key_valid, sink, strip: int, batch: int, n_k: int, device, sink_keys: int = 0):
    """Split the keys of one non-causal sub-problem into the estimator's keys and keys kept exact for every query.

    The exact keys are the last ``strip`` keys (the window across a causal boundary) and the sinks
    (``sink [B, Nk]``, at most ``sink_keys`` a row; 0: their positions are not needed) outside them. Returns
    ``(est_valid [B, Nk] or None, pos [B, e], ok [B, e])``: the estimator's keys, and the positions of the exact
    keys with their validity (``e = 0``: none)."""
    strip = min(strip, n_k)
    lo = n_k - strip
    pos_parts, ok_parts = [], []
    est = key_valid
    if strip:
        pos_parts.append(torch.arange(lo, n_k, device=device).expand(batch, strip))
        ok_parts.append(
            torch.ones(batch, strip, dtype=torch.bool, device=device) if key_valid is None else key_valid[:, lo:]
        )
        est = torch.ones(batch, n_k, dtype=torch.bool, device=device) if est is None else est.clone()
        est[:, lo:] = False
    if sink is not None:
        s_in = sink.clone()
        s_in[:, lo:] = False
        if sink_keys and lo:
            pos, ok = first_marked(s_in[:, :lo], sink_keys)
            pos_parts.append(pos)
            ok_parts.append(ok)
        est = (torch.ones(batch, n_k, dtype=torch.bool, device=device) if est is None else est) & ~s_in
    if not pos_parts:
        return est, None, None
    return est, torch.cat(pos_parts, 1), torch.cat(ok_parts, 1)


def pad_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, H, N, ...]`` padded with zero rows to ``n`` (itself when it has ``n`` rows)."""
    if x.shape[2] == n:
        return x
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, n - x.shape[2]))


def sub_view(x: torch.Tensor, part: Part, queries: bool) -> torch.Tensor:
    """The part's sub-problems of contiguous ``x [B, H, L, ...]`` (its queries, or its keys), as the strided view
    ``[B, count, H, s, ...]`` (sub-problem ``c`` is rows ``c * chunk + off + [0, s)``); masks ``[B, L]`` give
    ``[B, count, s]``."""
    off, s = (part.q_off, part.sq) if queries else (part.k_off, part.sk)
    st = x.stride()
    if x.dim() == 2:
        return x.as_strided(
            (x.shape[0], part.count, s), (st[0], part.chunk * st[1], st[1]), x.storage_offset() + off * st[1]
        )
    shape = (x.shape[0], part.count, x.shape[1], s, *x.shape[3:])
    strides = (st[0], part.chunk * st[2], st[1], st[2], *st[3:])
    return x.as_strided(shape, strides, x.storage_offset() + off * st[2])


def batched(x: torch.Tensor) -> torch.Tensor:
    """``[B, count, ...]`` -> ``[B * count, ...]`` (a copy unless the view allows it)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class Operands(NamedTuple):
    """A part's operands: queries padded to ``q_len`` rows, its keys/values padded to ``k_len`` (contiguous), the
    valid keys ``[B, k_len]`` (None: every key valid, no padding) and the sinks among them (None: none)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor | None
    sink: torch.Tensor | None


def part_masks(part: Part, key_valid, sink, batch: int, device):
    """The valid keys and the sinks of ``part``'s key range, padded to ``k_len`` (``[B, k_len]`` bool each, or None:
    every key valid and no padding / no sinks), from the call's ``key_valid`` and ``sink`` ``[B, Nk]``."""
    lo, hi = part.keys
    valid = None if key_valid is None else key_valid[:, lo:hi]
    sink = None if sink is None else sink[:, lo:hi]
    pad = part.k_len - (hi - lo)
    if pad:
        if valid is None:
            valid = torch.ones(batch, hi - lo, dtype=torch.bool, device=device)
        valid = torch.nn.functional.pad(valid, (0, pad))
        sink = None if sink is None else torch.nn.functional.pad(sink, (0, pad))
    contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
    return contiguous(valid), contiguous(sink)


def operands(part: Part, q, k, v, key_valid, sink) -> Operands:
    """The operands of ``part`` from the call's ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``key_valid [B, Nk]`` and
    ``sink [B, Nk]`` (each None or a tensor)."""
    lo, hi = part.keys
    valid, sink = part_masks(part, key_valid, sink, q.shape[0], q.device)
    k, v = pad_rows(k[:, :, lo:hi], part.k_len), pad_rows(v[:, :, lo:hi], part.k_len)
    q = pad_rows(q, part.q_len)
    return Operands(q.contiguous(), k.contiguous(), v.contiguous(), valid, sink)


class HyperInputs(NamedTuple):
    """What a ``"hyper"`` part's sub-problems (``B * count`` of them) attend to besides their queries."""

    est: torch.Tensor | None  # [B*count, sk] the estimator's keys (blocked and sampled), None: all keys
    extras: tuple[torch.Tensor, torch.Tensor] | None  # ([B*count, e] positions, validity) of the exact extras
    draws: Draws  # the sortLSH permutations and residual draws over the estimator's keys


def hyper_inputs(part: Part, valid, sink, ranks, p: HyperConfig) -> HyperInputs:
    """The estimator's keys, exact extras and draws of a ``"hyper"`` part from its padded key masks (`part_masks`)
    and the LSH bucket ranks of its operands' rows ``(q_rank [B, Hq, q_len], k_rank [B, Hkv, k_len])``."""
    B, device = ranks[0].shape[0], ranks[0].device
    valid = None if valid is None else batched(sub_view(valid, part, False))
    sink = None if sink is None else batched(sub_view(sink, part, False))
    est, pos, ok = exact_keys(valid, sink, part.strip, B * part.count, part.sk, device, p.sink_keys)
    q_rank = batched(sub_view(ranks[0], part, True))
    k_rank = batched(sub_view(ranks[1], part, False))
    draws = draws_from_ranks(
        q_rank, k_rank, est, p.block_size, p.sample_size, p.lsh_num_projs, p.seed, part.stream, p.residual
    )
    return HyperInputs(est, None if pos is None else (pos, ok), draws)


def part_ranks(part: Part, q, k, p: HyperConfig):
    """LSH bucket ranks of every row of a part's operands, ``([B, Hq, q_len], [B, Hkv, k_len])``, from the call's
    unpadded ``q`` and ``k``: row-wise, so a sub-problem's ranks are the view of these, and a zero padding row
    ranks 0."""
    lo, hi = part.keys
    q_rank, k_rank = lsh_ranks(q, k[:, :, lo:hi], p.lsh_num_projs, p.seed)
    pad = lambda x, n: x if x.shape[-1] == n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))  # noqa: E731
    return pad(q_rank, part.q_len).contiguous(), pad(k_rank, part.k_len).contiguous()


def call_sinks(plan: CallPlan, key_valid, batch: int, device):
    """The call's sinks (``[B, Nk]``), or None."""
    return sink_mask(key_valid, batch, plan.n_k, plan.config.sink_keys, device)
