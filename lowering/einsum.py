"""The einsum family: attention written with two einsums, rewritten on the Dynamo graph into one SDPA node.

``einsum(q, k) -> [scale] -> [mask] -> [fp32 upcast] -> softmax -> [cast back] -> [inert dropout] -> einsum(p, v)``
in any consistent index spelling and head layout (``bhid,bhjd->bhij``, ``bqhd,bkhd->bhqk``,
``...id,...jd->...ij``, ``bid,bjd->bij``, ...): one contracted head dim, one query and one key axis, at most two
batch axes present in q, k and v alike. q, k and v are permuted to ``[B, H, N, D]`` and the scores' mask to
``[B, H, Nq, Nk]`` order. A fill (``masked_fill`` / ``where``) is judged after every scale that follows it: the
mask is a hard mask only if the fill, so scaled, still excludes its keys (``<= masks.MASKED``).
"""

from __future__ import annotations

import operator
import string
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from .builder import SDPA, Builder, Unsupported, bind, same
from .graph import is_call, is_method, meta_val, tensor_of
from .masks import MASKED
from .sites import is_softmax

EINSUM = (torch.einsum, torch.functional.einsum)


def _einsum_parts(node: fx.Node) -> tuple[str, list[fx.Node]] | None:
    if not is_call(node, *EINSUM) or not node.args or not isinstance(node.args[0], str):
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
        t = tensor_of(op)
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
    if not is_method(n, *_CASTS) or n.args[0] is not prev:
        return False
    a, b = tensor_of(n), tensor_of(prev)
    return a is not None and b is not None and a.shape == b.shape and a.device == b.device


def _scalar_factor(x) -> object | None:
    """A number, or a node holding a symbolic float/int (``dynamic=True`` makes float attributes symbolic)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and isinstance(meta_val(x), (torch.SymFloat, torch.SymInt)):
        return x
    return None


class _EinsumSite:
    """The parsed chain of one einsum attention."""

    def __init__(self, softmax: fx.Node):
        self.softmax = softmax
        self.factors_before: list[tuple[object, bool]] = []  # (factor, divide)
        self.factors_after: list[tuple[object, bool]] = []
        self.mask: tuple[str, fx.Node] | None = None  # ("add", m) / ("keep", m) / ("drop", m)
        self.fill: float = 0.0  # a keep / drop mask's fill, as written (before the factors after it)
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
    while not is_call(n, *EINSUM):
        up.append(n)
        if len(up) > 12 or not n.args:
            raise Unsupported("softmax input is not a (scaled, masked) einsum of q and k")
        if is_call(n, torch.where) and len(n.args) == 3:
            # where(mask, scores, fill) / where(mask, fill, scores): the scores are the tensor operand
            cand = [
                a
                for a in n.args[1:]
                if isinstance(a, fx.Node) and tensor_of(a) is not None and tensor_of(a).shape == tensor_of(n).shape
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
            and tensor_of(n.args[0]) is not None
            and tensor_of(n.args[0]).shape != tensor_of(n).shape
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
        softmax, lambda n: is_call(n, *EINSUM), limit=4, too_long="the probabilities do not feed an einsum with v"
    )
    return qk, chain, down, pv


def _read_einsum_chain(site: _EinsumSite, qk: fx.Node, chain: list[fx.Node], down: list[fx.Node]):
    """Fill ``site`` from the ops between the einsums; raises `Unsupported`."""
    base = tensor_of(qk)
    prev = qk
    for n in chain:
        out = tensor_of(n)
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
            if n.kwargs or not isinstance(other, fx.Node) or tensor_of(other) is None:
                raise Unsupported("a bias added to the scores is not a tensor mask")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask = ("add", other)
        elif (is_method(n, "masked_fill", "masked_fill_") or is_call(n, torch.masked_fill)) and n.args[0] is prev:
            a = bind(n, ("self", "mask", "value"), {})
            fill = a.get("value")
            if isinstance(fill, bool) or not isinstance(fill, (int, float)):
                raise Unsupported("masked_fill with a fill value that is not a number")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask, site.fill = ("drop", a["mask"]), float(fill)
        elif is_call(n, torch.where) and len(n.args) == 3:
            cond, a, b = n.args
            if a is prev and isinstance(b, (int, float)) and not isinstance(b, bool):
                kind, fill = "keep", b
            elif b is prev and isinstance(a, (int, float)) and not isinstance(a, bool):
                kind, fill = "drop", a
            else:
                raise Unsupported("torch.where whose fill is not a number")
            if site.mask:
                raise Unsupported("more than one mask on the scores")
            site.mask, site.fill = (kind, cond), float(fill)
        else:
            raise Unsupported(f"unsupported op between the einsum and the softmax ({n.target})")
        prev = n
    if site.mask and site.mask[0] != "add":
        _check_fill(site.fill, site.factors_after)
    # the softmax
    sm = site.softmax
    if sm.op == "call_method":
        a = bind(sm, ("self", "dim", "dtype"), {"dim": None, "dtype": None})
    elif sm.target is F.softmax:
        a = bind(sm, ("input", "dim", "_stacklevel", "dtype"), {"dim": None, "dtype": None})
    else:
        a = bind(sm, ("input", "dim", "dtype"), {"dim": None, "dtype": None})
    if a.get("dtype") not in (None, torch.float32, base.dtype):
        raise Unsupported(f"softmax in {a.get('dtype')}")
    if not isinstance(a.get("dim"), int):
        raise Unsupported("softmax dim is not a constant")
    site.dim = a["dim"] % base.dim()
    prev = sm
    for n in down:
        if _is_cast(n, prev):
            if tensor_of(n).dtype not in (torch.float32, base.dtype):
                raise Unsupported(f"probabilities cast to {tensor_of(n).dtype}")
        elif is_call(n, F.dropout, torch.dropout) and n.args and n.args[0] is prev:
            d = bind(
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


def _check_fill(fill: float, factors_after: list[tuple[object, bool]]) -> None:
    """The fill of a keep / drop mask, times every scale after it, must still exclude its keys (``<= MASKED``):
    ``masked_fill(s, m, -1e4) / 1e4`` fills -1, which is a bias, not a mask."""
    scaled = fill
    for f, divide in factors_after:
        if not isinstance(f, float):
            raise Unsupported("a symbolic scale after a masked fill (its value decides whether the fill still masks)")
        scaled = scaled / f if divide else scaled * f
    if not scaled <= MASKED:
        raise Unsupported(f"the fill {fill:g}, times the scale after it, is {scaled:g}: not -inf-like")


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
    t = tensor_of(m)
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
    tq, tk, tv = tensor_of(q), tensor_of(k), tensor_of(v)
    if not (tq.dtype == tk.dtype == tv.dtype == tensor_of(qk).dtype == tensor_of(pv).dtype):
        raise Unsupported("q, k, v and the einsums do not share one dtype")
    if not tq.is_floating_point():
        raise Unsupported("integer einsum")
    for c, pc in zip(batch, pbatch):
        sq, sk, sv = tq.shape[qs.index(c)], tk.shape[ks.index(c)], tv.shape[vs.index(pc)]
        if not (same(sq, sk) and same(sk, sv)):
            raise Unsupported("q, k and v batch dims differ (einsum broadcasting)")
    if not same(tk.shape[ks.index(j)], tv.shape[vs.index(pj)]):
        raise Unsupported("k and v lengths differ")
    nb = len(batch)
    canon = "".join(batch) + i + j
    q4 = _to_4d(b, _permute(b, q, qs, "".join(batch) + i + d), nb)
    k4 = _to_4d(b, _permute(b, k, ks, "".join(batch) + j + d), nb)
    v4 = _to_4d(b, _permute(b, v, vs, "".join(pbatch) + pj + e), nb)
    kwargs = {"scale": _fold_scale(b, site.factors_before + site.factors_after)}
    if site.mask is not None:
        kind, m = site.mask
        m = _mask_to_canonical(b, m, out1, canon)
        if kind == "add":
            if site.factors_after:
                m = b.fn(operator.mul, m, _fold_scale(b, site.factors_after))
            if tensor_of(m).dtype != tq.dtype:
                m = b.method("to", m, tq.dtype)
        elif kind == "keep":
            m = m if tensor_of(m).dtype == torch.bool else b.method("bool", m)
        else:  # drop: keep is its negation (~~x is x)
            if (
                is_call(m, operator.invert, torch.logical_not, torch.bitwise_not)
                and tensor_of(m.args[0]).dtype == torch.bool
            ):
                m = m.args[0]
            else:
                m = b.fn(operator.invert, m if tensor_of(m).dtype == torch.bool else b.method("bool", m))
        kwargs["attn_mask"] = m
    out = b.fn(SDPA, q4, k4, v4, **kwargs)
    o = out
    for _ in range(2 - nb):
        o = b.method("squeeze", o, 0)
    o = _permute(b, o, "".join(pbatch) + pi + e, out2)
    return out, o, [pv, *reversed(down), softmax, *reversed(chain), qk]


def anchor(softmax: fx.Node) -> fx.Node:
    """Where the SDPA form of the site is emitted: before the einsum with v (raises `Unsupported`)."""
    return _parse_einsum_site(softmax)[3]


def is_einsum_site(node: fx.Node) -> bool:
    """A softmax fed by an einsum: an einsum site, even when its chain is not one `einsum_sdpa` reads."""
    if not is_softmax(node):
        return False
    try:
        _parse_einsum_site(node)
    except Unsupported:
        n = node.args[0] if node.args else None
        for _ in range(12):
            if not isinstance(n, fx.Node):
                return False
            if is_call(n, *EINSUM):
                return True
            n = n.args[0] if n.args else None
        return False
    return True
