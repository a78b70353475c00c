"""Inputs the autotuner measures on: captured Q/K/V from a file, or built-in synthetic families.

File format (``--inputs FILE``), written with ``torch.save`` and read with ``torch.load(weights_only=True)``:

* a dict ``{"q": Tensor, "k": Tensor, "v": Tensor}`` with shapes ``q [B, Hq, N, D]``, ``k [B, Hkv, N, D]``,
  ``v [B, Hkv, N, D]`` (``Hq`` a multiple of ``Hkv``, as for grouped-query attention), exactly as the model
  passes them to attention (after RoPE, before the softmax scale);
* optional keys: ``"scale"`` (float, the softmax scale the model uses; default ``1/sqrt(D)``), ``"name"``
  (str, e.g. ``"layer 7"``), ``"causal"`` (bool, informational: ``--causal`` decides);
* or a list of such dicts (for instance one per layer). Every entry must have the same ``D``.

Tensors may have any floating dtype and live on any device; they are cast to ``--dtype`` and moved to the
tuning device. Tuning at length ``n`` uses the first ``n`` positions of every entry (a causal prefix is itself
a causal problem), so ``N`` must be at least the longest ``--seq``. Example::

    torch.save([{"q": q7, "k": k7, "v": v7, "name": "layer 7"}], "qkv.pt")

Synthetic families (``--family``) stand in when nothing was captured. Independent Gaussian q and k make
attention nearly uniform over all n keys, which no real head does and which makes every sparse approximation
look terrible, so the default family, ``mixed``, builds the structure real heads show:

* ``local``: rotary position features (RoPE-like frequencies), so nearby keys score higher;
* ``topics``: contiguous topic segments that recur along the sequence: keys of the query's topic score higher
  and carry related values (what the LSH buckets should find);
* ``sink``: one early key that every query attends to with a moderate weight and a small value;
* ``mixed``: all three, with head-dependent strengths;
* ``gaussian``: independent N(0, 1) entries (the near-uniform worst case, for comparison only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FAMILIES = ("mixed", "local", "topics", "sink", "gaussian")


@dataclass
class Sample:
    """One attention problem: ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``, the softmax scale, a label."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    name: str

    def prefix(self, n: int) -> Sample:
        """The first ``n`` positions, contiguous."""
        cut = lambda x: x[:, :, :n].contiguous()  # noqa: E731
        return Sample(cut(self.q), cut(self.k), cut(self.v), self.scale, self.name)


class InputError(ValueError):
    """A ``--inputs`` file that does not hold Q/K/V in the documented format."""


def load_inputs(path: str, *, dtype: torch.dtype, device: torch.device, min_len: int) -> list[Sample]:
    """Read captured Q/K/V (format in the module docstring). Raises `InputError` with the reason."""
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except Exception as e:  # unpickling refused, truncated file, not a torch file...
        raise InputError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from None
    items = data if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise InputError(f"{path}: the list is empty")
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(data, (list, tuple)) else path
        out.append(_sample(item, where, dtype, device, min_len))
    dims = {s.q.shape[-1] for s in out}
    if len(dims) > 1:
        raise InputError(f"{path}: entries have different head dims {sorted(dims)}")
    return out


def _sample(item, where, dtype, device, min_len) -> Sample:
    if not isinstance(item, dict) or not all(name in item for name in ("q", "k", "v")):
        raise InputError(f"{where}: expected a dict with tensors 'q', 'k', 'v'")
    q, k, v = item["q"], item["k"], item["v"]
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise InputError(f"{where}: '{name}' must be a floating [B, H, N, D] tensor")
    if k.shape != v.shape[:3] + k.shape[3:] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise InputError(
            f"{where}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            f"do not agree (expected [B, Hq, N, D], [B, Hkv, N, D], [B, Hkv, N, Dv])"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise InputError(f"{where}: q and k need the same D, and Hq a multiple of Hkv")
    if q.shape[2] < min_len:
        raise InputError(f"{where}: holds {q.shape[2]} positions, fewer than the requested length {min_len}")
    scale = item.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
        raise InputError(f"{where}: 'scale' must be a number")
    name = str(item.get("name", where))
    move = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return Sample(move(q), move(k), move(v), None if scale is None else float(scale), name)


# ----------------------------------------------------------------------------------------------------------
# synthetic families
# ----------------------------------------------------------------------------------------------------------


def synthetic(
    family: str, *, n: int, head_dim: int, heads: int, batch: int = 1, dtype=torch.float32, device="cpu", seed: int = 0
) -> Sample:
    """A ``[batch, heads, n, head_dim]`` problem from ``family`` (see the module docstring). Deterministic in
    ``seed``; a prefix of a longer draw is not the same as a shorter draw."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if head_dim < 8 or head_dim % 4:
        raise ValueError(f"synthetic inputs need a head dim that is a multiple of 4 and >= 8, got {head_dim}")
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, n, head_dim)
    if family == "gaussian":
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    else:
        q, k, v = _structured(family, g, batch, heads, n, head_dim)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return Sample(cast(q), cast(k), cast(v), None, f"synthetic:{family}")


def _structured(family, g, B, H, n, d):
    """q, k, v as sums of a rotary (position) part and a topic part, plus a sink, scaled so the logits
    ``q.k / sqrt(d)`` land in the range trained heads show (peaks of 5 to 10 over a background near 0)."""
    half = d // 2  # first half: rotary features; second half: topic features
    u = torch.rand(H, generator=g)  # per-head mix, so heads differ as they do in real models
    w_local = {"local": 1.0, "topics": 0.0, "sink": 0.4, "mixed": 0.5 + 0.5 * u}.get(family)
    w_topic = {"local": 0.0, "topics": 1.0, "sink": 0.4, "mixed": 1.0 - 0.5 * u}.get(family)
    w_sink = {"local": 0.0, "topics": 0.0, "sink": 1.0, "mixed": 1.0}.get(family)
    w_local, w_topic = (
        torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1, 1).expand(H, 1, 1) for w in (w_local, w_topic)
    )
    pos = torch.arange(n, dtype=torch.float64)
    # rotary: q_i . k_j = a^2 * sum_f cos(theta_f (i - j)), large for nearby positions
    freq = 10000.0 ** (-torch.arange(half // 2, dtype=torch.float64) / (half // 2))
    ang = pos[:, None] * freq[None, :]  # [n, half/2]
    rot = torch.cat([torch.cos(ang), torch.sin(ang)], -1).float()  # [n, half]
    a_rot = math.sqrt(7.0 * math.sqrt(d) / (half // 2))  # peak local logit ~ 7
    # topics: segments of mean length 256 drawn from 64 recurring topics
    num_topics = 64
    seg_len = torch.empty(n // 16 + 2).exponential_(1 / 256.0, generator=g).ceil().long().clamp(min=16)
    seg_topic = torch.randint(num_topics, (seg_len.numel(),), generator=g)
    topic = torch.repeat_interleave(seg_topic, seg_len)[:n]
    if topic.numel() < n:
        topic = torch.cat([topic, torch.zeros(n - topic.numel(), dtype=torch.long)])
    centers = torch.nn.functional.normalize(torch.randn(H, num_topics, half, generator=g), dim=-1)
    a_topic = math.sqrt(6.0 * math.sqrt(d))  # same-topic logit ~ 6
    out = []
    for _ in range(B):
        noise = lambda: torch.randn(H, n, d, generator=g)  # noqa: E731
        feat_rot = rot.expand(H, n, half) * a_rot
        feat_top = centers[:, topic] * a_topic  # [H, n, half]
        qk = [torch.cat([feat_rot * w_local.sqrt(), feat_top * w_topic.sqrt()], -1) for _ in range(2)]
        q = qk[0] + 0.5 * noise()
        k = qk[1] + 0.5 * noise()
        v_centers = torch.randn(H, num_topics, d, generator=g)
        v = v_centers[:, topic] * w_topic.sqrt() + noise()
        if w_sink:
            # every query leans towards direction s; key 0 points along it: logit ~ 4 * w_sink, small value
            s = torch.nn.functional.normalize(torch.randn(H, 1, d, generator=g), dim=-1)
            lean = math.sqrt(4.0 * w_sink * math.sqrt(d))
            q = q + lean * s
            k[:, 0] = lean * s[:, 0] * 2.0
            v[:, 0] = 0.1 * v[:, 0]
        out.append((q, k, v))
    return tuple(torch.stack([o[i] for o in out]) for i in range(3))
