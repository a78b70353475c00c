"""Canonicalisation: attention written in other ways, rewritten on the Dynamo graph into one SDPA node.

Runs on the Dynamo graph after the sites are found and numbered, before `hyper_backend.lowering.sdpa` lowers
SDPA calls, so every later step (mask proofs, GQA, scale, the report) is shared. Families:

- ``einsum``: ``einsum(q, k) -> [scale] -> [mask] -> [fp32 upcast] -> softmax -> [cast back] -> [inert dropout]
  -> einsum(p, v)`` in any consistent index spelling and head layout (``bhid,bhjd->bhij``,
  ``bqhd,bkhd->bhqk``, ``...id,...jd->...ij``, ``bid,bjd->bij``, ...): one contracted head dim, one query and
  one key axis, at most two batch axes present in q, k and v alike. q, k and v are permuted to
  ``[B, H, N, D]`` and the scores' mask to ``[B, H, Nq, Nk]`` order.
- ``mha``: ``F.multi_head_attention_forward`` (what ``nn.MultiheadAttention`` and the Transformer layers run under
  ``torch.compile`` in every mode: torch 2.13 keeps it as one node in the Dynamo graph, and the module's
  native fast path is not taken while Dynamo traces), and ``torch._native_multi_head_attention`` called directly:
  the same input projections, an SDPA call with the masks merged as the function merges them, and the output
  projection.
- ``encoder_layer``: ``torch._transformer_encoder_layer_fwd``, the native fast path that
  ``nn.TransformerEncoderLayer`` takes in eval mode without grad: its layer norms (``norm_first`` or not),
  residuals, ReLU/GELU feed-forward, and its attention as above with the native op's mask convention (a mask is
  converted to bool, True = masked, whatever its dtype; mask types 0 ``[L, S]``, 1 ``[B, S]``, 2
  ``[B, H, L, S]``).

A site is rewritten only if the new SDPA node is lowered (`sdpa.plan_sdpa` accepts it and ``layers`` selects
it). Otherwise the graph keeps its own computation and the site its reason. A canonicalised site carries
``kind="sdpa"`` while `sdpa.rewrite_sdpa` handles it, and ``family`` (the kind `explain` shows) from then on
(`sites.record`).
"""

from __future__ import annotations

import operator
import string
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import masks
from .sdpa import plan_sdpa, zero_or_masked
from .sites import Site, is_softmax

SDPA = torch._C._nn.scaled_dot_product_attention
EINSUM = (torch.einsum, torch.functional.einsum)
MASKED = masks.MASKED


class Unsupported(Exception):
    """The site is not the computation a canonical form expresses; the message is the site's reason."""


# ----------------------------------------------------------------------------------------------------------
# emitting nodes with fake values
# ----------------------------------------------------------------------------------------------------------


class Builder:
    """Creates nodes before ``anchor``, each with its ``example_value`` computed on the graph's fake tensors."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, like: fx.Node):
        self.graph, self.anchor, self.like = graph, anchor, like
        self.created: list[fx.Node] = []
        self.fake_mode = next(
            (
                v.fake_mode
                for v in map(masks.meta_val, graph.nodes)
                if isinstance(v, torch.Tensor) and hasattr(v, "fake_mode")
            ),
            None,
        )
        if self.fake_mode is None:
            raise Unsupported("the graph has no fake values")

    def _make(self, op: str, target, args, kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.create_node(op, target, tuple(args), dict(kwargs))
        for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if key in self.like.meta:
                node.meta[key] = self.like.meta[key]
        fargs = fx.node.map_arg(tuple(args), masks.meta_val)
        fkwargs = fx.node.map_arg(dict(kwargs), masks.meta_val)
        with self.fake_mode:
            if op == "call_function":
                value = target(*fargs, **fkwargs)
            else:
                value = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
        node.meta["example_value"] = value
        self.created.append(node)
        return node

    def fn(self, target, *args, **kwargs) -> fx.Node:
        return self._make("call_function", target, args, kwargs)

    def method(self, name: str, *args, **kwargs) -> fx.Node:
        return self._make("call_method", name, args, kwargs)

    def discard(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created = []


def _val(n):
    return masks.meta_val(n)


def _tensor(n) -> torch.Tensor | None:
    v = _val(n)
    return v if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    """Sizes ``a == b``: proven, or, for symbolic sizes (``dynamic=True`` makes every dim symbolic, the embedding
    dim too), decided on the sizes seen under a guard. Used only where the original computation requires the
    equality (it fails otherwise), so the guard specialises nothing that could run."""
    if statically_known_true(a == b):
        return True
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(a == b)
    return False


def _bind(node: fx.Node, names: Sequence[str], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _is_call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _is_method(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target in names


# ----------------------------------------------------------------------------------------------------------
# einsum
# ----------------------------------------------------------------------------------------------------------


def _einsum_parts(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    if not _is_call(node, *EINSUM) or not node.args or not isinstance(node.args[0], str):
        return None
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if len(ops) != 2 or not all(isinstance(o, fx.Node) for o in ops):
        return None
    return node.args[0], ops


def _parse_equation(eq: str, operands: Sequence[fx.Node]) -> tuple[list[str], str]:
    """``(specs of the operands, spec of the output)`` with ``...`` expanded to letters; raises `Unsupported`."""
    eq = eq.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used]
    widths = []
    for spec, op in zip(specs, operands):
        t = _tensor(op)
        if t is None:
            raise Unsupported("einsum operand without a shape")
        if "..." in spec:
            widths.append(t.dim() - (len(spec) - 3))
        elif len(spec) != t.dim():
            raise Unsupported(f"einsum {eq!r}: operand rank does not match")
    if widths and len(set(widths)) != 1:
        raise Unsupported(f"einsum {eq!r}: the '...' dims differ between operands (broadcast)")
    ell = "".join(spare[: widths[0]]) if widths else ""
    specs = [s.replace("...", ell) for s in specs]
    if not arrow:  # implicit output: the letters that appear once, sorted
        counts = {c: sum(s.count(c) for s in specs) for c in set("".join(specs))}
        rhs = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    else:
        if "..." in rhs:
            rhs = rhs.replace("...", ell)
    for s in specs + [rhs]:
        if not s.isalpha() and s:
            raise Unsupported(f"einsum {eq!r}: unsupported characters")
        if len(set(s)) != len(s):
            raise Unsupported(f"einsum {eq!r}: a repeated index (diagonal)")
    return specs, rhs


def _walk_chain(
    start: fx.Node, is_stop: Callable[[fx.Node], bool], limit: int | None = None, too_long: str = ""
) -> tuple[list[fx.Node], fx.Node]:
    """``(chain, stop)``: the nodes from ``start``'s user up to the first one ``is_stop`` accepts (exclusive), each
    the only user of the previous; more than ``limit`` of them raises `Unsupported` (``too_long``)."""
    chain, n = [], start
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise Unsupported("scores or probabilities are used elsewhere")
        n = users[0]
        if is_stop(n):
            return chain, n
        chain.append(n)
        if limit is not None and len(chain) > limit:
            raise Unsupported(too_long)
        if len(chain) > 12:
            raise Unsupported("too many ops between the einsums and the softmax")


_CASTS = ("float", "half", "bfloat16", "to", "type", "type_as", "double")


def _is_cast(n: fx.Node, prev: fx.Node) -> bool:
    if not _is_method(n, *_CASTS) or n.args[0] is not prev:
        return False
    a, b = _tensor(n), _tensor(prev)
    return a is not None and b is not None and a.shape == b.shape and a.device == b.device


def _scalar_factor(x) -> object | None:
    """A number, or a node holding a symbolic float/int (``dynamic=True`` makes float attributes symbolic)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and isinstance(_val(x), (torch.SymFloat, torch.SymInt)):
        return x
    return None


class _EinsumSite:
    """The parsed chain of one einsum attention."""

    def __init__(self, softmax: fx.Node):
        self.softmax = softmax
        self.factors_before: list[tuple[object, bool]] = []  # (factor, divide)
        self.factors_after: list[tuple[object, bool]] = []
        self.mask: tuple[str, fx.Node] | None = None  # ("add", m) / ("keep", m) / ("drop", m)
        self.dim = -1  # the softmax dim, normalised
        self.p: fx.Node | None = None  # the probabilities as the pv einsum reads them


def _parse_einsum_site(softmax: fx.Node):
    """``(qk einsum, ops from it to the softmax, ops from the softmax to the pv einsum, pv einsum)``; raises
    `Unsupported`."""
    # upstream: softmax input back to an einsum, through scale / mask / cast ops
    x = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    if not isinstance(x, fx.Node):
        raise Unsupported("softmax input is not a node")
    up = []
    n = x
    while not _is_call(n, *EINSUM):
        up.append(n)
        if len(up) > 12 or not n.args:
            raise Unsupported("softmax input is not a (scaled, masked) einsum of q and k")
        if _is_call(n, torch.where) and len(n.args) == 3:
            # where(mask, scores, fill) / where(mask, fill, scores): the scores are the tensor operand
            cand = [
                a
                for a in n.args[1:]
                if isinstance(a, fx.Node) and _tensor(a) is not None and _tensor(a).shape == _tensor(n).shape
            ]
            if len(cand) != 1:
                raise Unsupported("torch.where with two score-shaped operands")
            n = cand[0]
        elif (
            n.op in ("call_function", "call_method")
            and n.target in (operator.mul, torch.mul, "mul", "__mul__")
            and isinstance(n.args[1], fx.Node)
            and not isinstance(n.args[0], fx.Node)
        ):
            n = n.args[1]
        elif (
            n.op in ("call_function", "call_method")
            and n.target in (operator.add, torch.add, "add", "__add__")
            and isinstance(n.args[1], fx.Node)
            and _tensor(n.args[0]) is not None
            and _tensor(n.args[0]).shape != _tensor(n).shape
        ):
            n = n.args[1]  # mask + scores
        else:
            n = n.args[0]  # scores * s, scores + mask, masked_fill, casts
        if not isinstance(n, fx.Node):
            raise Unsupported("softmax input is not a (scaled, masked) einsum of q and k")
    qk = n
    chain, _ = _walk_chain(qk, lambda n: n is softmax)
    # downstream: softmax -> casts / dropout -> einsum
    down, pv = _walk_chain(
        softmax, lambda n: _is_call(n, *EINSUM), limit=4, too_long="the probabilities do not feed an einsum with v"
    )
    return qk, chain, down, pv


def _read_einsum_chain(site: _EinsumSite, qk: fx.Node, chain: list[fx.Node], down: list[fx.Node]):
    """Fill ``site`` from the ops between the einsums; raises `Unsupported`."""
    base = _tensor(qk)
    prev = qk
    for n in chain:
        out = _tensor(n)
        if out is None or tuple(out.shape) != tuple(base.shape):
            raise Unsupported("an op between the einsum and the softmax changes the scores' shape")
        if _is_cast(n, prev):
            if out.dtype not in (torch.float32, base.dtype):
                raise Unsupported(f"scores cast to {out.dtype}")
        elif n.op in ("call_function", "call_method") and n.target in (
            operator.mul,
            torch.mul,
            "mul",
            "__mul__",
            operator.truediv,
            torch.div,
            "div",
            "__truediv__",
        ):
            other = n.args[1] if n.args[0] is prev else n.args[0]
            divide = n.target in (operator.truediv, torch.div, "div", "__truediv__")
            if divide and n.args[0] is not prev:
                raise Unsupported("the scores divide a number")
            if n.kwargs:
                raise Unsupported("a scale with keyword arguments")
            f = _scalar_factor(other)
            if f is None:
                raise Unsupported("the scale is a tensor, not a number")
            (site.factors_after if site.mask else site.factors_before).append((f, divide))
        elif n.op in ("call_function", "call_method") and n.target in (operator.add, torch.add, "add", "__add__"):
            other = n.args[1] if n.args[0] is prev else n.args[0]
            if n.kwargs or not isinstance(other, fx.Node) or _tensor(other) is None:
                raise Unsupported("a bias added to the scores is not a tensor mask")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask = ("add", other)
        elif (_is_method(n, "masked_fill", "masked_fill_") or _is_call(n, torch.masked_fill)) and n.args[0] is prev:
            a = _bind(n, ("self", "mask", "value"), {})
            fill = a.get("value")
            if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not fill <= MASKED:
                raise Unsupported("masked_fill with a fill value that is not -inf-like")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask = ("drop", a["mask"])
        elif _is_call(n, torch.where) and len(n.args) == 3:
            cond, a, b = n.args
            if a is prev and isinstance(b, (int, float)) and not isinstance(b, bool) and b <= MASKED:
                kind = "keep"
            elif b is prev and isinstance(a, (int, float)) and not isinstance(a, bool) and a <= MASKED:
                kind = "drop"
            else:
                raise Unsupported("torch.where whose fill is not an -inf-like number")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask = (kind, cond)
        else:
            raise Unsupported(f"unsupported op between the einsum and the softmax ({n.target})")
        if (
            site.mask
            and site.mask[0] != "add"
            and any(not isinstance(f, float) or f <= 0 for f, _ in site.factors_after)
        ):
            raise Unsupported("a scale after a -inf mask that is not a positive number")
        prev = n
    # the softmax
    sm = site.softmax
    if sm.op == "call_method":
        a = _bind(sm, ("self", "dim", "dtype"), {"dim": None, "dtype": None})
    elif sm.target is F.softmax:
        a = _bind(sm, ("input", "dim", "_stacklevel", "dtype"), {"dim": None, "dtype": None})
    else:
        a = _bind(sm, ("input", "dim", "dtype"), {"dim": None, "dtype": None})
    if a.get("dtype") not in (None, torch.float32, base.dtype):
        raise Unsupported(f"softmax in {a.get('dtype')}")
    if not isinstance(a.get("dim"), int):
        raise Unsupported("softmax dim is not a constant")
    site.dim = a["dim"] % base.dim()
    prev = sm
    for n in down:
        if _is_cast(n, prev):
            if _tensor(n).dtype not in (torch.float32, base.dtype):
                raise Unsupported(f"probabilities cast to {_tensor(n).dtype}")
        elif _is_call(n, F.dropout, torch.dropout) and n.args and n.args[0] is prev:
            d = _bind(
                n,
                ("input", "p", "training", "inplace") if n.target is F.dropout else ("input", "p", "train"),
                {"p": 0.5, "training": True, "train": True},
            )
            active = d.get("training", d.get("train"))
            if not isinstance(d["p"], (int, float)) or not isinstance(active, bool):
                raise Unsupported("dropout with a symbolic probability or mode")
            if active and d["p"] > 0:
                raise Unsupported(f"dropout on the attention probabilities (p={d['p']}) in training")
        else:
            raise Unsupported(f"unsupported op between the softmax and the einsum with v ({n.target})")
        prev = n
    site.p = prev


def _roles(specs: list[str], out: str, eq: str):
    a, b = specs
    contracted = (set(a) & set(b)) - set(out)
    if len(contracted) != 1:
        raise Unsupported(f"einsum {eq!r} contracts {len(contracted)} indices (attention contracts one head dim)")
    for s in (a, b):
        for c in s:
            if c not in out and c not in contracted:
                raise Unsupported(f"einsum {eq!r} sums over {c!r}, which is in one operand only")
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    if len(only_a) != 1 or len(only_b) != 1:
        raise Unsupported(f"einsum {eq!r}: not one query and one key index")
    batch = [c for c in out if c in a and c in b]
    if set(out) != set(batch) | only_a | only_b:
        raise Unsupported(f"einsum {eq!r}: output indices are not batch, query and key indices")
    return contracted.pop(), only_a.pop(), only_b.pop(), batch


def _permute(b: Builder, x: fx.Node, spec: str, order: str) -> fx.Node:
    perm = [spec.index(c) for c in order]
    return x if perm == list(range(len(perm))) else b.method("permute", x, *perm)


def _to_4d(b: Builder, x: fx.Node, nb: int) -> fx.Node:
    for _ in range(2 - nb):
        x = b.method("unsqueeze", x, 0)
    return x


def _mask_to_canonical(b: Builder, m: fx.Node, out: str, canon: str) -> fx.Node:
    """A mask broadcast against scores laid out as ``out`` -> broadcast against ``canon`` (batch, query, key),
    which SDPA's right-aligned broadcasting then extends to ``[B, H, Nq, Nk]``."""
    t = _tensor(m)
    if t.dim() > len(out):
        raise Unsupported("the mask has more dims than the scores")
    if out == canon:
        return m
    for _ in range(len(out) - t.dim()):
        m = b.method("unsqueeze", m, 0)
    return _permute(b, m, out, canon)


def _fold_scale(b: Builder, factors: list[tuple[object, bool]]):
    """The product of the factors: a number, or a node holding a symbolic float."""
    number, node = 1.0, None
    for f, divide in factors:
        if isinstance(f, float):
            number = number / f if divide else number * f
        else:
            f = b.fn(operator.truediv, 1.0, f) if divide else f
            node = f if node is None else b.fn(operator.mul, node, f)
    if node is None:
        return number
    return node if number == 1.0 else b.fn(operator.mul, node, number)


def einsum_sdpa(b: Builder, softmax: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]]:
    """Emit the SDPA form of the einsum attention around ``softmax``: ``(sdpa node, output node, replaced nodes)``;
    the output node replaces the pv einsum (the first replaced node), the others die with it. Raises
    `Unsupported`."""
    qk, chain, down, pv = _parse_einsum_site(softmax)
    site = _EinsumSite(softmax)
    _read_einsum_chain(site, qk, chain, down)
    eq1, ops1 = _einsum_parts(qk)
    eq2, ops2 = _einsum_parts(pv)
    specs1, out1 = _parse_equation(eq1, ops1)
    d, ia, jb, batch = _roles(specs1, out1, eq1)
    if len(batch) > 2:
        raise Unsupported(f"einsum {eq1!r}: more than two batch indices")
    key_letter = out1[site.dim]
    if key_letter == jb:
        (qs, q), (ks, k), i, j = (specs1[0], ops1[0]), (specs1[1], ops1[1]), ia, jb
    elif key_letter == ia:
        (qs, q), (ks, k), i, j = (specs1[1], ops1[1]), (specs1[0], ops1[0]), jb, ia
    else:
        raise Unsupported(f"softmax over {key_letter!r}, a batch index of einsum {eq1!r}")
    if ops2[0] is site.p:
        p_at, v = 0, ops2[1]
    elif ops2[1] is site.p:
        p_at, v = 1, ops2[0]
    else:
        raise Unsupported("the probabilities are not an operand of the second einsum")
    if ops2[0] is ops2[1]:
        raise Unsupported("the second einsum multiplies the probabilities with themselves")
    specs2, out2 = _parse_equation(eq2, ops2)
    ps, vs = specs2[p_at], specs2[1 - p_at]
    if len(ps) != len(out1):
        raise Unsupported(f"einsum {eq2!r}: the probabilities' rank does not match the scores'")
    role = {ps[t]: out1[t] for t in range(len(ps))}  # letter of eq2 -> letter of eq1 at that position
    pj = ps[out1.index(j)]
    contracted = (set(ps) & set(vs)) - set(out2)
    if contracted != {pj}:
        raise Unsupported(f"einsum {eq2!r} does not contract the probabilities' key index only")
    e = set(vs) - set(ps)
    if len(e) != 1 or not e <= set(out2):
        raise Unsupported(f"einsum {eq2!r}: v has not exactly one value index")
    e = e.pop()
    pi = ps[out1.index(i)]
    pbatch = [ps[out1.index(c)] for c in batch]
    if set(out2) != set(pbatch) | {pi, e} or set(vs) != set(pbatch) | {pj, e}:
        raise Unsupported(f"einsum {eq2!r}: the output is not v's value index over the query and batch indices")
    del role
    tq, tk, tv = _tensor(q), _tensor(k), _tensor(v)
    if not (tq.dtype == tk.dtype == tv.dtype == _tensor(qk).dtype == _tensor(pv).dtype):
        raise Unsupported("q, k, v and the einsums do not share one dtype")
    if not tq.is_floating_point():
        raise Unsupported("integer einsum")
    for c, pc in zip(batch, pbatch):
        sq, sk, sv = tq.shape[qs.index(c)], tk.shape[ks.index(c)], tv.shape[vs.index(pc)]
        if not (_same(sq, sk) and _same(sk, sv)):
            raise Unsupported("q, k and v batch dims differ (einsum broadcasting)")
    if not _same(tk.shape[ks.index(j)], tv.shape[vs.index(pj)]):
        raise Unsupported("k and v lengths differ")
    nb = len(batch)
    canon = "".join(batch) + i + j
    q4 = _to_4d(b, _permute(b, q, qs, "".join(batch) + i + d), nb)
    k4 = _to_4d(b, _permute(b, k, ks, "".join(batch) + j + d), nb)
    v4 = _to_4d(b, _permute(b, v, vs, "".join(pbatch) + pj + e), nb)
    kwargs = {"scale": _fold_scale(b, site.factors_before + site.factors_after)}
    described = []
    if site.mask is not None:
        kind, m = site.mask
        m = _mask_to_canonical(b, m, out1, canon)
        if kind == "add":
            if site.factors_after:
                m = b.fn(operator.mul, m, _fold_scale(b, site.factors_after))
            if _tensor(m).dtype != tq.dtype:
                m = b.method("to", m, tq.dtype)
        elif kind == "keep":
            m = m if _tensor(m).dtype == torch.bool else b.method("bool", m)
        else:  # drop: keep is its negation (~~x is x)
            if (
                _is_call(m, operator.invert, torch.logical_not, torch.bitwise_not)
                and _tensor(m.args[0]).dtype == torch.bool
            ):
                m = m.args[0]
            else:
                m = b.fn(operator.invert, m if _tensor(m).dtype == torch.bool else b.method("bool", m))
        kwargs["attn_mask"] = m
        described.append("mask")
    out = b.fn(SDPA, q4, k4, v4, **kwargs)
    o = out
    for _ in range(2 - nb):
        o = b.method("squeeze", o, 0)
    o = _permute(b, o, "".join(pbatch) + pi + e, out2)
    return out, o, [pv, *reversed(down), softmax, *reversed(chain), qk]


# ----------------------------------------------------------------------------------------------------------
# nn.MultiheadAttention: F.multi_head_attention_forward and the native op
# ----------------------------------------------------------------------------------------------------------

_MHA_PARAMS = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)
_MHA_DEFAULTS = {
    "training": True,
    "key_padding_mask": None,
    "need_weights": True,
    "attn_mask": None,
    "use_separate_proj_weight": False,
    "q_proj_weight": None,
    "k_proj_weight": None,
    "v_proj_weight": None,
    "static_k": None,
    "static_v": None,
    "average_attn_weights": True,
    "is_causal": False,
}
_NATIVE_PARAMS = (
    "query",
    "key",
    "value",
    "embed_dim",
    "num_head",
    "qkv_weight",
    "qkv_bias",
    "proj_weight",
    "proj_bias",
    "mask",
    "need_weights",
    "average_attn_weights",
    "mask_type",
)
_ENCODER_PARAMS = (
    "src",
    "embed_dim",
    "num_heads",
    "qkv_weight",
    "qkv_bias",
    "proj_weight",
    "proj_bias",
    "use_gelu",
    "norm_first",
    "eps",
    "norm_weight_1",
    "norm_bias_1",
    "norm_weight_2",
    "norm_bias_2",
    "ffn_weight_1",
    "ffn_bias_1",
    "ffn_weight_2",
    "ffn_bias_2",
    "mask",
    "mask_type",
)


def _check_users(node: fx.Node, need_weights) -> None:
    if any(not _is_call(u, operator.getitem) or u.args[0] is not node for u in node.users):
        raise Unsupported("the result is used other than by indexing")
    if need_weights and any(u.args[1] != 0 for u in node.users):
        raise Unsupported("attention weights are returned")


def _const(a: dict, name: str, types=(bool, int, float)):
    v = a.get(name)
    if isinstance(v, fx.Node) or (v is not None and not isinstance(v, types)):
        raise Unsupported(f"{name} is not a compile-time constant")
    return v


def _pure(b: Builder, n: fx.Node, hops: int = 6) -> fx.Node:
    """``n``, with ``F._canonical_mask``'s in-place ``zeros_like(m).masked_fill_(m, -inf)`` (through views)
    re-emitted out of place, so the mask proofs can evaluate it (they never evaluate a value changed in place).
    Same values: the zeros are fresh and used by nothing else."""
    if (
        hops
        and _is_method(n, "view", "expand", "reshape", "unsqueeze", "contiguous")
        and isinstance(n.args[0], fx.Node)
    ):
        inner = _pure(b, n.args[0], hops - 1)
        return n if inner is n.args[0] else b.method(n.target, inner, *n.args[1:], **n.kwargs)
    if _is_method(n, "masked_fill_") and len(n.args) == 3 and not n.kwargs:
        z = n.args[0]
        if _is_call(z, torch.zeros_like, torch.zeros) and len(z.users) == 1:
            return b.method("masked_fill", b.fn(z.target, *z.args, **z.kwargs), *n.args[1:])
    return n


def _float_mask(b: Builder, m: fx.Node, dtype) -> fx.Node:
    """``F._canonical_mask``: a bool mask (True = masked) as an additive float mask; a float one as is."""
    m = _pure(b, m)
    if _tensor(m).dtype == torch.bool:
        z = b.fn(torch.zeros_like, m, dtype=dtype)
        return b.method("masked_fill", z, m, float("-inf"))
    if not _tensor(m).is_floating_point():
        raise Unsupported("an integer mask")
    return m


def _projections(b: Builder, a: dict, E: int):
    """q, k, v projected as ``F._in_projection_packed`` / ``F._in_projection`` do (same linear calls)."""
    query, key, value = a["query"], a["key"], a["value"]
    if not a["use_separate_proj_weight"]:
        w, bias = a["in_proj_weight"], a["in_proj_bias"]
        if not isinstance(w, fx.Node):
            raise Unsupported("in_proj_weight is None")
        if key is value and query is key:
            chunks = b.method("chunk", b.fn(F.linear, query, w, bias), 3, -1)
            return tuple(b.fn(operator.getitem, chunks, t) for t in range(3))
        if key is value:
            ws = b.method("split", w, [E, 2 * E])
            bs = b.method("split", bias, [E, 2 * E]) if bias is not None else None
            q = b.fn(F.linear, query, b.fn(operator.getitem, ws, 0), bs and b.fn(operator.getitem, bs, 0))
            kv = b.fn(F.linear, key, b.fn(operator.getitem, ws, 1), bs and b.fn(operator.getitem, bs, 1))
            kv = b.method("chunk", kv, 2, -1)
            return q, b.fn(operator.getitem, kv, 0), b.fn(operator.getitem, kv, 1)
        ws = b.method("chunk", w, 3)
        bs = b.method("chunk", bias, 3) if bias is not None else None
        return tuple(
            b.fn(F.linear, x, b.fn(operator.getitem, ws, t), bs and b.fn(operator.getitem, bs, t))
            for t, x in enumerate((query, key, value))
        )
    ws = [a[f"{x}_proj_weight"] for x in "qkv"]
    if not all(isinstance(w, fx.Node) for w in ws):
        raise Unsupported("use_separate_proj_weight without q/k/v_proj_weight")
    bias = a["in_proj_bias"]
    bs = b.method("chunk", bias, 3) if bias is not None else None
    return tuple(
        b.fn(F.linear, x, w, bs and b.fn(operator.getitem, bs, t))
        for t, (x, w) in enumerate(zip((a["query"], a["key"], a["value"]), ws))
    )


def _heads(b: Builder, x: fx.Node, H: int, D: int) -> fx.Node:
    """``[L, B, H*D]`` -> ``[B, H, L, D]``."""
    return b.method("permute", b.method("unflatten", x, -1, (H, D)), 1, 2, 0, 3)


def mha_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    """``F.multi_head_attention_forward`` as projections + SDPA + output projection (need_weights=False's path);
    ``(sdpa node, attention output node, description)``. Raises `Unsupported`."""
    a = _bind(node, _MHA_PARAMS, _MHA_DEFAULTS)
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a.get(name) is not None:
            raise Unsupported(f"{name} is set (add_bias_kv / static keys)" if "bias" in name else f"{name} is set")
    if _const(a, "add_zero_attn"):
        raise Unsupported("add_zero_attn=True")
    need_weights = _const(a, "need_weights")
    training, is_causal = _const(a, "training"), _const(a, "is_causal")
    dropout_p = _const(a, "dropout_p", (int, float))
    _check_users(node, need_weights)
    H = _const(a, "num_heads", (int,))
    E = _const(a, "embed_dim_to_check", (int,))
    tq, tk, tv = _tensor(a["query"]), _tensor(a["key"]), _tensor(a["value"])
    if tq is None or tk is None or tv is None:
        raise Unsupported("query/key/value are not tensors")
    if tq.dim() not in (2, 3) or tk.dim() != tq.dim() or tv.dim() != tq.dim():
        raise Unsupported("query/key/value are not [L, B, E] (or unbatched [L, E])")
    if not _same(tq.shape[-1], E) or E % H:
        raise Unsupported("embed_dim does not match the query")
    D = E // H
    batched = tq.dim() == 3
    query, key, value = a["query"], a["key"], a["value"]
    kpm, mask = a["key_padding_mask"], a["attn_mask"]
    if not batched:  # F.mha unsqueezes the batch dim
        same_kv, same_qk = key is value, query is key
        query = b.method("unsqueeze", query, 1)
        key = query if same_qk else b.method("unsqueeze", key, 1)
        value = key if same_kv else b.method("unsqueeze", value, 1)
        if kpm is not None:
            kpm = b.method("unsqueeze", kpm, 0)
        a = {**a, "query": query, "key": key, "value": value}
    L, B = _tensor(query).shape[0], _tensor(query).shape[1]
    S = _tensor(key).shape[0]
    dtype = tq.dtype
    if kpm is not None:
        kv = _tensor(kpm)
        if kv.dim() != 2 or not (_same(kv.shape[0], B) and _same(kv.shape[1], S)):
            raise Unsupported("key_padding_mask is not [B, S]")
        kpm = _float_mask(b, kpm, dtype)
    causal = False
    if is_causal and mask is None:
        raise Unsupported("is_causal without attn_mask (F.multi_head_attention_forward raises)")
    if is_causal and kpm is None and not need_weights:
        mask, causal = None, True  # F.mha drops the mask and passes is_causal to SDPA
    elif mask is not None:
        mv = _tensor(mask)
        if mv.dim() == 2:
            if not (_same(mv.shape[0], L) and _same(mv.shape[1], S)):
                raise Unsupported("attn_mask is not [L, S]")
            mask = b.method("unsqueeze", b.method("unsqueeze", _float_mask(b, mask, dtype), 0), 0)
        elif mv.dim() == 3:
            if not (_same(mv.shape[0], B * H) and _same(mv.shape[1], L) and _same(mv.shape[2], S)):
                raise Unsupported("attn_mask is not [B*H, L, S]")
            mask = b.method("unflatten", _float_mask(b, mask, dtype), 0, (-1, H))
        else:
            raise Unsupported("attn_mask is not 2-D or 3-D")
    if kpm is not None:
        k4 = b.method("unsqueeze", b.method("unsqueeze", kpm, 1), 1)  # [B, 1, 1, S]
        mask = k4 if mask is None else b.fn(operator.add, mask, k4)
    if not training:
        dropout_p = 0.0
    q, k, v = _projections(b, a, E)
    kwargs = {"attn_mask": mask, "dropout_p": float(dropout_p), "is_causal": causal}
    sdpa = b.fn(SDPA, _heads(b, q, H, D), _heads(b, k, H, D), _heads(b, v, H, D), **kwargs)
    out = b.method("flatten", b.method("permute", sdpa, 2, 0, 1, 3), -2)  # [L, B, E]
    out = b.fn(F.linear, out, a["out_proj_weight"], a["out_proj_bias"])
    if not batched:
        out = b.method("squeeze", out, 1)
    return sdpa, out, "need_weights=True, weights unused" if need_weights else ""


def _native_keep_mask(b: Builder, mask: fx.Node | None, mask_type, B, H, L, S) -> fx.Node | None:
    """The native op's mask (any dtype, converted to bool, True = masked) as an SDPA bool keep mask.

    A merged ``attn + key_padding`` float mask (mask type 2, `nn.MultiheadAttention.merge_masks`) whose padding
    part is ``zeros.masked_fill(bool, -inf)`` is split into ``~attn.bool() & ~padding.bool()``: with one addend
    in {0, -inf}, ``(a + b) != 0`` is ``a != 0 or b != 0`` (NaN included), so the split is exact."""
    if mask is None:
        return None
    mv = _tensor(mask)
    mask = _pure(b, mask)
    if mask_type == 1:
        if mv.dim() != 2 or not (_same(mv.shape[0], B) and _same(mv.shape[1], S)):
            raise Unsupported("mask type 1 (key padding) is not [B, S]")
        keep = b.fn(operator.invert, b.method("bool", mask))
        return b.method("unsqueeze", b.method("unsqueeze", keep, 1), 1)
    if mask_type == 0:
        if mv.dim() != 2 or not (_same(mv.shape[0], L) and _same(mv.shape[1], S)):
            raise Unsupported("mask type 0 is not [L, S]")
        return b.fn(operator.invert, b.method("bool", mask))
    if mask_type != 2:
        raise Unsupported(f"mask_type={mask_type}")
    if mv.dim() != 4:
        raise Unsupported("mask type 2 is not [B, H, L, S]")
    terms = [mask]
    if (
        _is_call(mask, operator.add)
        and all(isinstance(t, fx.Node) for t in mask.args)
        and any(zero_or_masked(t) for t in mask.args)
    ):
        terms = list(mask.args)
    keep = None
    for t in terms:
        while _is_method(t, "expand"):  # SDPA broadcasts: the AND of the unexpanded terms is the same mask
            t = t.args[0]
        t = _pure(b, t)
        k = b.fn(operator.invert, b.method("bool", t))
        keep = k if keep is None else b.fn(operator.and_, keep, k)
    return keep


def native_mha_sdpa(b: Builder, x: fx.Node, a: dict) -> tuple[fx.Node, fx.Node]:
    """``torch._native_multi_head_attention(x, x, x, ..., need_weights=False)`` on batch-first ``x [B, L, E]``:
    ``(sdpa node, output node)``."""
    E, H = _const(a, "embed_dim", (int,)), _const(a, "num_head", (int,))
    tx = _tensor(x)
    if tx is None or tx.dim() != 3 or not _same(tx.shape[-1], E) or E % H:
        raise Unsupported("the native attention's input is not [B, L, E]")
    D = E // H
    B, L = tx.shape[0], tx.shape[1]
    keep = _native_keep_mask(b, a.get("mask"), _const(a, "mask_type", (int,)), B, H, L, L)
    proj = b.fn(F.linear, x, a["qkv_weight"], a["qkv_bias"])
    chunks = b.method("chunk", proj, 3, -1)
    q, k, v = (
        b.method("transpose", b.method("unflatten", b.fn(operator.getitem, chunks, t), -1, (H, D)), 1, 2)
        for t in range(3)
    )
    sdpa = b.fn(SDPA, q, k, v, attn_mask=keep)
    out = b.method("flatten", b.method("transpose", sdpa, 1, 2), -2)  # [B, L, E]
    return sdpa, b.fn(F.linear, out, a["proj_weight"], a["proj_bias"])


def native_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    a = _bind(
        node, _NATIVE_PARAMS, {"mask": None, "need_weights": True, "average_attn_weights": True, "mask_type": None}
    )
    if not (a["query"] is a["key"] is a["value"]):
        raise Unsupported("torch._native_multi_head_attention with distinct query/key/value")
    _check_users(node, _const(a, "need_weights"))
    sdpa, out = native_mha_sdpa(b, a["query"], a)
    return sdpa, out, ""


def encoder_layer_sdpa(b: Builder, node: fx.Node) -> tuple[fx.Node, fx.Node, str]:
    """``torch._transformer_encoder_layer_fwd`` decomposed (aten ``transformer_encoder_layer_forward``)."""
    a = _bind(node, _ENCODER_PARAMS, {"mask": None, "mask_type": None})
    E, eps = _const(a, "embed_dim", (int,)), _const(a, "eps", (int, float))
    norm_first, use_gelu = _const(a, "norm_first"), _const(a, "use_gelu")
    src = a["src"]
    if _tensor(src) is None or _tensor(src).dim() != 3:
        raise Unsupported("the encoder layer's input is not [B, L, E]")

    def norm(x, t):
        return b.fn(F.layer_norm, x, (E,), a[f"norm_weight_{t}"], a[f"norm_bias_{t}"], eps)

    x = norm(src, 1) if norm_first else src
    sdpa, x = native_mha_sdpa(
        b,
        x,
        {
            "embed_dim": E,
            "num_head": a["num_heads"],
            "qkv_weight": a["qkv_weight"],
            "qkv_bias": a["qkv_bias"],
            "proj_weight": a["proj_weight"],
            "proj_bias": a["proj_bias"],
            "mask": a["mask"],
            "mask_type": a["mask_type"],
        },
    )
    x = b.fn(operator.add, x, src)
    if not norm_first:
        x = norm(x, 1)
    pre = x
    if norm_first:
        x = norm(x, 2)
    x = b.fn(F.linear, x, a["ffn_weight_1"], a["ffn_bias_1"])
    x = b.fn(F.gelu, x) if use_gelu else b.fn(F.relu, x)
    x = b.fn(F.linear, x, a["ffn_weight_2"], a["ffn_bias_2"])
    x = b.fn(operator.add, x, pre)
    if not norm_first:
        x = norm(x, 2)
    return sdpa, x, ""


# ----------------------------------------------------------------------------------------------------------
# the pass
# ----------------------------------------------------------------------------------------------------------


def _is_einsum_site(node: fx.Node) -> bool:
    if not is_softmax(node):
        return False
    try:
        qk, _, _, pv = _parse_einsum_site(node)
    except Unsupported:
        # a softmax fed by an einsum is an einsum site even when its chain is not one we read
        n = node.args[0] if node.args else None
        for _ in range(12):
            if not isinstance(n, fx.Node):
                return False
            if _is_call(n, *EINSUM):
                return True
            n = n.args[0] if n.args else None
        return False
    return True


def family_of(site: Site, node: fx.Node) -> str:
    if site.kind == "mha":
        return "mha"
    if site.kind == "encoder_layer":
        return "encoder_layer"
    if site.kind == "attention" and _is_einsum_site(node):
        return "einsum"
    return ""


def canonicalize(
    gm: fx.GraphModule, sites: dict[str, Site], constants: dict[fx.Node, torch.Tensor], selected: Callable[[Site], bool]
) -> int:
    """Rewrite the einsum / MHA / encoder-layer sites of ``gm`` into SDPA nodes where those are lowered.

    ``sites``: the graph's sites by node name (updated: a rewritten site is keyed by its SDPA node, a site kept
    exact here is removed, so no later pass revisits it). Returns the number of rewritten sites.
    """
    graph = gm.graph
    done = 0
    for node in list(graph.nodes):
        site = sites.get(node.name)
        if site is None:
            continue
        family = family_of(site, node)
        if not family:
            continue
        site.family, site.kind = family, "sdpa"
        b = Builder(graph, node, node)
        try:
            if family == "einsum":
                _, _, _, pv = _parse_einsum_site(node)
                b = Builder(graph, pv, node)
                sdpa, out, replaced = einsum_sdpa(b, node)
            elif family == "encoder_layer":
                sdpa, out, _ = encoder_layer_sdpa(b, node)
                replaced = [node]
            else:
                sdpa, out, _ = (native_sdpa if node.target is torch._native_multi_head_attention else mha_sdpa)(b, node)
                replaced = [*node.users, node]  # the getitem [0] nodes, then the call
        except Exception as e:  # not a form we express (or an analysis we cannot finish): the site stays exact
            b.discard()
            del sites[node.name]
            site.decide(
                "exact", str(e) if isinstance(e, Unsupported) else f"could not canonicalise ({type(e).__name__}: {e})"
            )
            continue
        plan = plan_sdpa(sdpa, constants)
        reason = plan.reason
        if not reason and getattr(plan, "window", None) is None and not selected(site):
            reason = "not selected by layers"
        if reason:
            b.discard()
            del sites[node.name]
            site.decide("exact", reason)
            continue
        replaced[0].replace_all_uses_with(out)
        if family != "einsum":
            for r in replaced[1:-1]:
                r.replace_all_uses_with(out)
        for r in replaced:
            if not r.users:
                graph.erase_node(r)
        del sites[node.name]
        sites[sdpa.name] = site
        site.node = sdpa.name
        done += 1
    if done:
        gm.recompile()
    return done
