"""The CPU path's entry points: a `plan.CallPlan` executed part by part, merged through log-sum-exps.

Each part runs as few batched calls to aten's fused flash attention for CPU: ``"exact"`` and ``"causal"`` parts
are one fused call over all their sub-problems (the causal leaves of a sequence are one call), ``"hyper"`` parts
are `hyper.hyper_forward` on `hyper.Rows` gathered straight from the whole sequence, ``"band"`` parts are
`band.band_forward`. The first part writes the output; later parts merge into the rows they cover, in the plan's
order. Memory stays O(n).
"""

from __future__ import annotations

import torch

from hyper_backend.config import HyperConfig

from ..parts import (
    Operands,
    batched,
    call_sinks,
    exact_keys,
    hyper_inputs,
    operands,
    pad_rows,
    part_ranks,
    sub_view,
)
from ..plan import CallPlan, Part, lse_dtype, plan_call
from .band import band_backward, band_forward
from .hyper import Rows, hyper_backward, hyper_forward
from .threads import Threads, flash, flash_bwd, key_bias, mask_dtype, merge_, no_keys


def attention_forward(q, k, v, key_valid, is_causal: bool, scale: float, p: HyperConfig, serial: bool = True):
    """HyperAttention on CPU tensors ``q [B,Hq,Nq,D]``, ``k, v [B,Hkv,Nk,D]``, ``key_valid [B,Nk]`` bool or None
    (``p`` fitted to the call). Returns contiguous ``(out [B,Hq,Nq,D], lse [B,Hq,Nq])``, lse float32 (float64 for
    float64 inputs), -inf for rows without any key."""
    plan = plan_call(q.shape[2], k.shape[2], is_causal, p)
    with Threads.serial(serial):
        return forward(plan, q, k, v, key_valid, scale)


def attention_backward(
    do, q, k, v, out, lse, key_valid, is_causal: bool, scale: float, p: HyperConfig, serial: bool = True
):
    """Gradients ``(dq, dk, dv)`` of `attention_forward` given its final ``out`` and ``lse``."""
    plan = plan_call(q.shape[2], k.shape[2], is_causal, p)
    with Threads.serial(serial):
        return backward(plan, do, q, k, v, out, lse, key_valid, scale)


def _valid(ops: Operands, part: Part):
    return None if ops.valid is None else batched(sub_view(ops.valid, part, False))


def _band_keys(ops: Operands, part: Part):
    """The keys a ``"band"`` part may use: the estimator's keys (the sinks are the ``"hyper"`` part's extras)."""
    sink = None if ops.sink is None else batched(sub_view(ops.sink, part, False))
    return exact_keys(_valid(ops, part), sink, 0, ops.q.shape[0] * part.count, part.sk, ops.q.device)[0]


def _fused(part: Part, ops: Operands, x: torch.Tensor, queries: bool) -> torch.Tensor:
    """The part's sub-problems of ``x`` as one ``[B*count, H, s, D]`` batch (``x`` itself for a single one)."""
    s = part.sq if queries else part.sk
    if part.count == 1 and x.shape[2] == s and (part.q_off if queries else part.k_off) == 0:
        return x
    return batched(sub_view(x, part, queries))


def _part_forward(part: Part, ops: Operands, q, k, scale, p: HyperConfig):
    """``(out, lse)`` of one part: ``[B*count, Hq, sq, D]``, ``[B*count, Hq, sq]`` (``q``, ``k``: the call's)."""
    dtype = ops.q.dtype
    if part.kind == "hyper":
        inputs = hyper_inputs(part, ops.valid, ops.sink, part_ranks(part, q, k, p), p)
        rows = [Rows.of_part(x, part, i == 0) for i, x in enumerate((ops.q, ops.k, ops.v))]
        return hyper_forward(*rows, inputs, scale, part.window)
    if part.kind == "band":
        return band_forward(ops.q, ops.k, ops.v, _band_keys(ops, part), part.window, scale)
    causal = part.kind == "causal"
    valid = _valid(ops, part)
    fq, fk, fv = _fused(part, ops, ops.q, True), _fused(part, ops, ops.k, False), _fused(part, ops, ops.v, False)
    o, lse = flash(fq, fk, fv, key_bias(valid, mask_dtype(dtype)), causal, scale)
    if valid is not None:  # a row whose visible keys are all masked
        seen = (valid.cumsum(-1) > 0)[:, None, -part.sq :] if causal else valid.any(-1)[:, None, None]
        lse = no_keys(lse, seen.expand_as(lse))
    return o.contiguous(), lse.contiguous()  # aten's layout is [B, N, H, D]: merges then take the contiguous path


def forward(plan: CallPlan, q, k, v, key_valid, scale):
    B, Hq, Nq, D = q.shape
    sink = call_sinks(plan, key_valid, B, q.device)
    if len(plan.parts) == 1 and plan.parts[0].count == 1:  # one fused call or one hyper part: no accumulator
        part = plan.parts[0]
        o, lse = _part_forward(part, operands(part, q, k, v, key_valid, sink), q, k, scale, plan.config)
        return o[:, :, :Nq].contiguous(), lse[:, :, :Nq].to(lse_dtype(q.dtype)).contiguous()
    rows = max(part.q_len for part in plan.parts)
    acc = torch.empty(B, Hq, rows, D, dtype=lse_dtype(q.dtype), device=q.device)
    acc_lse = torch.empty(B, Hq, rows, dtype=lse_dtype(q.dtype), device=q.device)
    for i, part in enumerate(plan.parts):
        o, lse = _part_forward(part, operands(part, q, k, v, key_valid, sink), q, k, scale, plan.config)
        if part.q_len < acc.shape[2]:  # the KV prefix after the padded causal tail: merge into contiguous rows
            acc, acc_lse = acc[:, :, : part.q_len].contiguous(), acc_lse[:, :, : part.q_len].contiguous()
        o = o.view(B, part.count, Hq, part.sq, D)
        lse = lse.view(B, part.count, Hq, part.sq)
        view_o, view_l = sub_view(acc, part, True), sub_view(acc_lse, part, True)
        if i == 0:
            view_o.copy_(o)
            view_l.copy_(lse)
        else:
            merge_(view_o, view_l, o, lse)
    return acc[:, :, :Nq].to(q.dtype).contiguous(), acc_lse[:, :, :Nq].contiguous()


def _part_backward(part: Part, ops: Operands, q, k, do, out, lse, scale, p: HyperConfig):
    """``(dq, dk, dv)`` of one part: ``[B*count, H, s, D]``, given the call's final ``do``, ``out`` and ``lse``
    padded to the part's query rows (lse -inf already 0)."""
    if part.kind == "hyper":
        inputs = hyper_inputs(part, ops.valid, ops.sink, part_ranks(part, q, k, p), p)
        q_rows = [Rows.of_part(x, part, True) for x in (do, ops.q)]
        k_rows = [Rows.of_part(x, part, False) for x in (ops.k, ops.v)]
        lse_p = batched(sub_view(lse, part, True)).contiguous()
        return hyper_backward(*q_rows, *k_rows, Rows.of_part(out, part, True), lse_p, inputs, scale, part.window)
    if part.kind == "band":
        return band_backward(do, ops.q, ops.k, ops.v, out, lse, _band_keys(ops, part), part.window, scale)
    valid = _valid(ops, part)
    fq = lambda x: _fused(part, ops, x, True)  # noqa: E731
    fk = lambda x: _fused(part, ops, x, False)  # noqa: E731
    bias = key_bias(valid, mask_dtype(ops.q.dtype))
    return flash_bwd(fq(do), fq(ops.q), fk(ops.k), fk(ops.v), fq(out), fq(lse), bias, part.kind == "causal", scale)


def backward(plan: CallPlan, do, q, k, v, out, lse, key_valid, scale):
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    sink = call_sinks(plan, key_valid, B, q.device)
    lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), 0.0)  # rows with no keys: no NaN
    rows = max(part.q_len for part in plan.parts)
    dq = torch.zeros(B, Hq, rows, D, dtype=q.dtype, device=q.device)
    dkv: dict[tuple, tuple] = {}  # the parts' key ranges -> their dK, dV accumulators
    pad = lambda x, n: torch.nn.functional.pad(x, (0, n - x.shape[2])) if x.shape[2] != n else x  # noqa: E731
    for part in plan.parts:
        ops = operands(part, q, k, v, key_valid, sink)
        n = part.q_len
        do_p = pad_rows(do, n).contiguous()
        out_p = pad_rows(out, n).contiguous()
        dq_p, dk_p, dv_p = _part_backward(part, ops, q, k, do_p, out_p, pad(lse, n).contiguous(), scale, plan.config)
        sub_view(dq, part, True).add_(dq_p.reshape(B, part.count, Hq, part.sq, D))
        if part.keys not in dkv:
            dkv[part.keys] = tuple(torch.zeros(B, Hkv, part.k_len, D, dtype=k.dtype, device=k.device) for _ in "kv")
        for acc, grad in zip(dkv[part.keys], (dk_p, dv_p)):
            sub_view(acc, part, False).add_(grad.reshape(B, part.count, Hkv, part.sk, D))
    ranges = sorted(dkv)
    dk = torch.cat([dkv[r][0][:, :, : r[1] - r[0]] for r in ranges], 2)
    dv = torch.cat([dkv[r][1][:, :, : r[1] - r[0]] for r in ranges], 2)
    return dq[:, :, :Nq].contiguous(), dk.contiguous(), dv.contiguous()
