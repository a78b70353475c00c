"""Threads and aten's fused CPU attention: the calls every CPU part is made of.

Bookkeeping (gathers, masks, merges) runs on one thread and the fused attention calls on all of them
(`Threads`); `flash` / `flash_bwd` are aten's fused flash attention for CPU and its backward; `merge_` merges two
attention parts over disjoint key sets through their log-sum-exps.
"""

from __future__ import annotations

import contextlib

import torch

aten = torch.ops.aten
NEG_INF = float("-inf")


class Threads:
    """Bookkeeping (gathers, masks, merges) runs on one thread; the fused attention calls on all of them.

    On a shared machine every parallel region of a small op is a fork-join that waits for a descheduled
    thread: a 1M-element merge took 44 ms on two busy cores instead of about 1 ms. The attention calls are
    the work worth splitting; the rest is memory-bound and gains little from a second thread even when idle.
    `serial()` wraps an entry point; `flash` and `flash_bwd` restore the caller's thread count inside."""

    full = 0  # the caller's thread count while a serial() block runs, else 0

    @staticmethod
    @contextlib.contextmanager
    def serial(enabled: bool = True):
        if Threads.full or not enabled:
            yield
            return
        Threads.full = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(Threads.full)
            Threads.full = 0

    @staticmethod
    @contextlib.contextmanager
    def parallel():
        if not Threads.full:
            yield
            return
        torch.set_num_threads(Threads.full)
        try:
            yield
        finally:
            torch.set_num_threads(1)


def flash(q, k, v, mask, causal, scale):
    with Threads.parallel():
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def flash_bwd(do, q, k, v, out, lse, mask, causal, scale):
    with Threads.parallel():
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale
        )


def key_bias(key_valid, dtype):
    """``[B, Nk]`` bool -> ``[B, 1, 1, Nk]`` additive bias, or None."""
    if key_valid is None:
        return None
    return torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill_(~key_valid, NEG_INF)[
        :, None, None, :
    ]


def mask_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def no_keys(lse, any_key):
    """aten returns lse = 0 for a row whose keys are all masked; make it -inf so merging ignores the part."""
    if any_key is None:
        return lse
    return lse.masked_fill(~any_key, NEG_INF)


def merge_(acc_o, acc_l, o, l):
    """In place: ``(acc_o, acc_l) <- merge of two attention parts over disjoint key sets``."""
    new_l = torch.logaddexp(acc_l, l)
    # the two weights sum to 1, so the merge is one lerp toward the new part
    w_new = torch.exp(l - new_l).nan_to_num_(0.0)  # both parts empty: -inf - -inf
    acc_o.lerp_(o.to(acc_o.dtype), w_new[..., None].to(acc_o.dtype))
    acc_l.copy_(new_l)
