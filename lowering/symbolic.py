"""The mask language: what a mask subgraph computes, as an exact formula in the indices of each element.

A mask built from the sequence lengths (``arange`` comparisons, ``triu(full(-inf), 1)``, a slice of a causal
buffer, HF's ``create_causal_mask``) is a function of the element's position. Each tensor node of such a subgraph
gets an abstract value `Val` over its own index variables ``x_0 .. x_{r-1}`` (the position of an element):

- a bool tensor is a `Formula`: atoms ``a·x + c >= 0`` (``a`` integers, ``c`` an integer or an integer
  expression in the graph's sizes) under and / or / not;
- an integer tensor is a partition into pieces ``(condition, a·x + c)``;
- a floating tensor is a partition into pieces ``(condition, constant)``, each constant rounded as its dtype
  rounds it.

The language (`Interpreter`): ``arange`` / ``iota`` of integer sizes; ``ones`` / ``zeros`` / ``full`` (and the
``_like`` / ``new_`` forms, ``scalar_tensor``) with constant fills; integer constants and sizes; ``+``, ``-``,
negation, ``abs``, products by integer constants; comparisons; ``&``, ``|``, ``^``, ``~``; ``where`` and
``masked_fill`` with constant fills; ``tril`` / ``triu`` with integer offsets; dtype casts; views that insert or
drop size-1 dims, broadcast, permute, slice or select (offsets and steps integer sizes); a mutation in place only
where it is the computation itself (``zeros_like(m).masked_fill_(m, -inf)``); constant tensors (registered
buffers, graph constants) read by value, when they are a function of ``j - i`` on their last two dims (a causal
buffer is) and equal across the others. Anything else raises `Refused` with the reason: floor division, a
product of indices, a float literal compared with an index, a symbolic float, a tensor input, indexing by a
tensor, a reshape that merges dims, ...

Nothing here evaluates the mask at a size: the values are exact for every size the graph serves.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import aliases, attribute, is_scalar, meta_val, mutates, tensor_of

aten = torch.ops.aten
prims = torch.ops.prims
MAX_PIECES = 64
INPUT = "mask depends on a tensor input"


class Refused(Exception):
    """The subgraph is outside the mask language; the message is the reason."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


# ----------------------------------------------------------------------------------------------------------
# integer sizes
# ----------------------------------------------------------------------------------------------------------


def known(cond) -> bool:
    """``cond`` (a bool or a SymBool) holds for every size the graph serves; installs no guard."""
    return bool(cond) if isinstance(cond, bool) else statically_known_true(cond)


def as_int(x) -> int | None:
    """A size as a plain int, if it is one."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if expr.is_number else None
    return None


def free_symbols(x) -> set:
    return x.node.expr.free_symbols if isinstance(x, torch.SymInt) else set()


def is_one(size) -> bool:
    return known(size == 1)


# ----------------------------------------------------------------------------------------------------------
# affine forms and formulas
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Lin:
    """``sum(a * x_d for d, a in coef) + const``: integer coefficients, ``const`` an int or a SymInt."""

    coef: tuple[tuple[int, int], ...] = ()
    const: object = 0

    def __add__(self, other: Lin) -> Lin:
        coef = dict(self.coef)
        for d, a in other.coef:
            coef[d] = coef.get(d, 0) + a
        return Lin(tuple(sorted((d, a) for d, a in coef.items() if a)), self.const + other.const)

    def scaled(self, k: int) -> Lin:
        return Lin(tuple((d, a * k) for d, a in self.coef if a * k), self.const * k)

    def __neg__(self) -> Lin:
        return self.scaled(-1)

    def __sub__(self, other: Lin) -> Lin:
        return self + (-other)

    def subst(self, m: dict[int, Lin]) -> Lin:
        out = Lin(const=self.const)
        for d, a in self.coef:
            out = out + m[d].scaled(a)
        return out

    def constant(self) -> int | None:
        return as_int(self.const) if not self.coef else None


def var(d: int) -> Lin:
    return Lin(((d, 1),))


@dataclass(frozen=True, eq=False)
class Atom:
    lin: Lin  # lin >= 0


@dataclass(frozen=True, eq=False)
class Not:
    f: object


@dataclass(frozen=True, eq=False)
class And:
    fs: tuple


@dataclass(frozen=True, eq=False)
class Or:
    fs: tuple


def atom(lin: Lin):
    c = lin.constant()
    return (c >= 0) if c is not None else Atom(lin)


def ge(a: Lin, b: Lin):
    return atom(a - b)


def gt(a: Lin, b: Lin):
    return atom(a - b - Lin(const=1))


def nonzero(lin: Lin):
    return disj(gt(lin, Lin()), gt(Lin(), lin))


def neg(f):
    if isinstance(f, bool):
        return not f
    return f.f if isinstance(f, Not) else Not(f)


def _join(cls, unit: bool, fs):
    out = []
    for f in fs:
        if isinstance(f, bool):
            if f != unit:
                return not unit
            continue
        out.extend(f.fs if isinstance(f, cls) else (f,))
    if not out:
        return unit
    return out[0] if len(out) == 1 else cls(tuple(out))


def conj(*fs):
    return _join(And, True, fs)


def disj(*fs):
    return _join(Or, False, fs)


def subst(f, m: dict[int, Lin]):
    """The formula with each index variable ``d`` replaced by the form ``m[d]``."""
    if isinstance(f, bool):
        return f
    if isinstance(f, Atom):
        return atom(f.lin.subst(m))
    if isinstance(f, Not):
        return neg(subst(f.f, m))
    return (conj if isinstance(f, And) else disj)(*(subst(g, m) for g in f.fs))


def atoms(f):
    if isinstance(f, Atom):
        yield f
    elif isinstance(f, Not):
        yield from atoms(f.f)
    elif isinstance(f, (And, Or)):
        for g in f.fs:
            yield from atoms(g)


# ----------------------------------------------------------------------------------------------------------
# abstract values
# ----------------------------------------------------------------------------------------------------------


def kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        raise Refused("a complex mask")
    return "int"


def rounded(x: float, dtype: torch.dtype) -> float:
    """``x`` as a tensor of ``dtype`` holds it (call under `graph.real_mode`)."""
    return torch.tensor(x, dtype=torch.float64).to(dtype).item()


def _float_op(op, a: float, b: float, dtype: torch.dtype) -> float:
    return op(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)).item()


@dataclass(frozen=True, eq=False)
class Val:
    """A tensor of ``shape`` and ``dtype``: ``keep`` (bool) or ``pieces`` (a partition, see the module docstring).
    ``scalar``: a Python number (it takes part in type promotion as one)."""

    shape: tuple
    dtype: torch.dtype
    keep: object = None
    pieces: tuple = ()
    scalar: bool = False

    def formula(self):
        """Where the tensor is nonzero (``.bool()``)."""
        if self.keep is not None:
            return self.keep
        if kind(self.dtype) == "int":
            return disj(*(conj(c, nonzero(p)) for c, p in self.pieces))
        return disj(*(c for c, p in self.pieces if p != 0))

    def as_pieces(self, dtype: torch.dtype) -> list[tuple[object, object]]:
        """The pieces, converted to ``dtype``'s kind (not bool)."""
        k = kind(dtype)
        if self.keep is not None:
            src = [(self.keep, Lin(const=1)), (neg(self.keep), Lin())]
            src_kind = "int"
        else:
            src, src_kind = list(self.pieces), kind(self.dtype)
        return [(c, convert(p, src_kind, k, dtype)) for c, p in src]

    def remap(self, shape: tuple, m: dict[int, Lin]) -> Val:
        """The value with its index variables replaced by forms over the new ``shape``'s."""
        if self.keep is not None:
            return Val(shape, self.dtype, keep=subst(self.keep, m))
        return Val(
            shape,
            self.dtype,
            pieces=_pieces((subst(c, m), p.subst(m) if isinstance(p, Lin) else p) for c, p in self.pieces),
        )


def convert(p, src: str, dst: str, dtype: torch.dtype):
    """A payload of kind ``src`` as kind ``dst`` (``dtype`` rounds floats)."""
    if dst == "int":
        if src == "int":
            return p
        if p != p or p in (float("inf"), float("-inf")):
            raise Refused("a non-finite value cast to an integer type")
        return Lin(const=int(p))
    if src == "int":
        c = p.constant()
        if c is None:
            raise Refused("an index or a symbolic size cast to a floating type")
        return rounded(float(c), dtype)
    return rounded(p, dtype)


def _pieces(items) -> tuple:
    out = tuple((c, p) for c, p in items if c is not False)
    if len(out) > MAX_PIECES:
        raise Refused("mask too complex to prove (too many cases)")
    return out


def make(shape, dtype, pieces) -> Val:
    """A value of ``dtype`` from pieces of its kind (bool: pieces of 0/1 ints)."""
    if kind(dtype) == "bool":
        return Val(
            shape, dtype, keep=disj(*(conj(c, nonzero(p) if isinstance(p, Lin) else bool(p)) for c, p in pieces))
        )
    return Val(shape, dtype, pieces=_pieces(pieces))


def constant(shape, dtype, x) -> Val:
    """A tensor filled with the scalar ``x``."""
    if isinstance(x, (torch.SymFloat, torch.SymBool)):
        raise Refused("a symbolic float in a mask (dynamic=True makes float attributes symbolic)")
    k = kind(dtype)
    if k == "bool":
        return Val(shape, dtype, keep=bool(x))
    src = "int" if isinstance(x, (int, torch.SymInt)) else "float"
    p = Lin(const=int(x) if isinstance(x, bool) else x) if src == "int" else float(x)
    return Val(shape, dtype, pieces=((True, convert(p, src, k, dtype)),))


def scalar_val(x) -> Val:
    """A Python (or symbolic) scalar operand."""
    if isinstance(x, bool):
        return Val((), torch.bool, keep=x, scalar=True)
    if isinstance(x, (int, torch.SymInt)):
        return Val((), torch.int64, pieces=((True, Lin(const=x)),), scalar=True)
    if isinstance(x, float):
        return Val((), torch.float64, pieces=((True, x),), scalar=True)
    raise Refused("a symbolic float in a mask (dynamic=True makes float attributes symbolic)")


def broadcast(v: Val, shape: tuple) -> Val:
    """``v`` broadcast to ``shape`` (right-aligned; a size-1 dim reads index 0)."""
    if len(v.shape) > len(shape):
        raise Refused("a mask operand with more dims than the result")
    off = len(shape) - len(v.shape)
    m = {k: Lin() if is_one(s) else var(k + off) for k, s in enumerate(v.shape)}
    return v.remap(shape, m)


def constant_value(t: torch.Tensor) -> Val:
    """A constant tensor by value (call under `graph.real_mode`): uniform, or a function of ``j - i`` on its last
    two dims (a causal buffer is, ``tril(ones(M, M))``) that is the same across the other dims."""
    t = t.detach().cpu()
    shape, dtype = tuple(t.shape), t.dtype
    k = kind(dtype)
    flat = t.reshape(-1)
    if flat.numel() == 0:
        raise Refused("an empty constant mask")
    if k == "float" and bool(flat.isnan().any()):
        raise Refused("a constant mask holding NaN")
    if bool((flat == flat[0]).all()):
        return constant(shape, dtype, flat[0].item())
    if t.dim() < 2:
        raise Refused("a constant mask that is not a function of j - i")
    m1, m2 = shape[-2:]
    g = t.reshape(-1, m1, m2)
    if not bool((g == g[:1]).all()):
        raise Refused("a constant mask that differs across the batch or heads")
    g = g[0]
    for r in range(1, m1, 1024):  # Toeplitz: every diagonal constant (row chunks: O(1024 m2) memory)
        if not torch.equal(g[r : r + 1024, 1:], g[r - 1 : r + 1023, :-1][: g[r : r + 1024].shape[0]]):
            raise Refused("a constant mask that is not a function of j - i")
    diag = torch.cat([g[1:, 0].flip(0), g[0, :]])  # the value on diagonal t = j - i, t = -(m1 - 1) .. m2 - 1
    cuts = (diag[1:] != diag[:-1]).nonzero().flatten().tolist()
    if len(cuts) >= 16:
        raise Refused("a constant mask with too many distinct diagonals")
    i, j = len(shape) - 2, len(shape) - 1
    d = var(j) - var(i)
    bounds = [-(m1 - 1)] + [c + 1 - (m1 - 1) for c in cuts] + [m2]  # run r covers t in [bounds[r], bounds[r+1])
    pieces = []
    for r in range(len(bounds) - 1):
        lo = ge(d, Lin(const=bounds[r])) if r > 0 else True
        hi = gt(Lin(const=bounds[r + 1]), d) if r < len(bounds) - 2 else True
        x = diag[bounds[r] + (m1 - 1)].item()
        pieces.append((conj(lo, hi), Lin(const=int(x)) if k != "float" else float(x)))
    return make(shape, dtype, pieces)


# ----------------------------------------------------------------------------------------------------------
# the interpreter
# ----------------------------------------------------------------------------------------------------------


def _arg(args, kwargs, pos: int, names: tuple[str, ...] = (), default=None):
    if len(args) > pos:
        return args[pos]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return default


class Interpreter:
    """Abstract values of the nodes of one graph (memoised): `value` returns a `Val` or raises `Refused`.

    ``constants``: placeholders that are compile-time constants (registered buffers), read by value; every other
    tensor input is refused. Call under `graph.real_mode` (constant casts run real CPU ops)."""

    def __init__(self, constants: dict[fx.Node, torch.Tensor]):
        self.constants = constants
        self._memo: dict[fx.Node, Val | Refused] = {}
        self._order: dict[fx.Node, int] | None = None

    def value(self, node: fx.Node) -> Val:
        if node not in self._memo:
            try:
                self._memo[node] = self._value(node)
            except Refused as e:
                self._memo[node] = e
        out = self._memo[node]
        if isinstance(out, Refused):
            raise out
        return out

    def operand(self, a) -> Val:
        if isinstance(a, fx.Node):
            v = meta_val(a)
            return scalar_val(v) if is_scalar(v) else self.value(a)
        if isinstance(a, torch.Tensor):  # a constant inlined into the graph's arguments
            return constant_value(a)
        if is_scalar(a):
            return scalar_val(a)
        raise Refused(f"a mask operand of type {type(a).__name__}")

    def scalar(self, a):
        """A scalar argument (a size, an offset, a fill) as a Python or symbolic number."""
        v = meta_val(a) if isinstance(a, fx.Node) else a
        if not is_scalar(v):
            raise Refused("a tensor where the mask language needs a number")
        return v

    def _value(self, node: fx.Node) -> Val:
        if node in self.constants:
            return constant_value(self.constants[node])
        if node.op == "placeholder":
            raise Refused(INPUT)
        if node.op == "get_attr":
            t = attribute(node)
            if not isinstance(t, torch.Tensor):
                raise Refused("a mask built from a non-tensor attribute")
            return constant_value(t)
        if node.op not in ("call_function", "call_method"):
            raise Refused(f"a mask built by {node.op} {node.target}")
        name = _name(node)
        handler = _HANDLERS.get(name)
        if handler is None:
            raise Refused(f"a mask built with {name}, outside the mask language")
        if mutates(node):
            self._check_in_place(node)
        out = tensor_of(node)
        if out is None:
            raise Refused(f"{name} in a mask has no tensor value")
        v = handler(self, node, list(node.args), dict(node.kwargs), out)
        if len(v.shape) != out.dim() or v.dtype != out.dtype:  # (sizes are not compared: that would guard)
            raise Refused(f"{name}: the mask proof lost track of the shape or dtype")
        return Val(tuple(out.shape), out.dtype, v.keep, v.pieces)

    def _check_in_place(self, node: fx.Node) -> None:
        """``x.op_(...)`` is its out-of-place op when nothing else reads ``x`` after it, no other op changes ``x``
        and no view shares it."""
        if node.target is operator.setitem or not node.args or not isinstance(node.args[0], fx.Node):
            raise Refused("mask is changed in place (not a pure function of the lengths)")
        if self._order is None:
            self._order = {n: k for k, n in enumerate(node.graph.nodes)}
        for u in node.args[0].users:
            if u is not node and (aliases(u) or mutates(u) or self._order[u] > self._order[node]):
                raise Refused("mask is changed in place (not a pure function of the lengths)")


def _name(node: fx.Node) -> str:
    """The op's name in the mask language (aten overloads, torch functions, operators and methods alike)."""
    t = node.target
    if node.op == "call_method":
        name = t
    elif isinstance(t, torch._ops.OpOverload):
        name = t.overloadpacket.__name__
    else:
        name = getattr(t, "__name__", str(t))
    name = _DUNDER.get(name, name)
    if name.endswith("_") and not name.startswith("_") and name[:-1] in _HANDLERS:
        return name[:-1]  # in place: `Interpreter._check_in_place`
    return name


_DUNDER = {
    "__lt__": "lt",
    "__le__": "le",
    "__gt__": "gt",
    "__ge__": "ge",
    "__eq__": "eq",
    "__ne__": "ne",
    "__and__": "and",
    "__rand__": "and",
    "__or__": "or",
    "__ror__": "or",
    "__xor__": "xor",
    "__rxor__": "xor",
    "__invert__": "not",
    "__add__": "add",
    "__radd__": "add",
    "__sub__": "sub",
    "__rsub__": "rsub",
    "__mul__": "mul",
    "__rmul__": "mul",
    "__truediv__": "div",
    "__neg__": "neg",
    "__abs__": "abs",
    "__floordiv__": "floor_divide",
    "__mod__": "remainder",
    "and_": "and",
    "or_": "or",
    "invert": "not",
    "truediv": "div",
    "floordiv": "floor_divide",
    "mod": "remainder",
    "bitwise_and": "and",
    "logical_and": "and",
    "bitwise_or": "or",
    "logical_or": "or",
    "bitwise_xor": "xor",
    "logical_xor": "xor",
    "bitwise_not": "not",
    "logical_not": "not",
    "less": "lt",
    "less_equal": "le",
    "greater": "gt",
    "greater_equal": "ge",
    "not_equal": "ne",
    "subtract": "sub",
    "multiply": "mul",
    "divide": "div",
    "negative": "neg",
    "absolute": "abs",
    "swapaxes": "transpose",
    "swapdims": "transpose",
    "_unsafe_view": "view",
    "reshape": "view",
    "flatten": "view",
    "unflatten": "view",
    "squeeze": "view",
    "unsqueeze": "view",
    "view_as": "view",
    "reshape_as": "view",
    "expand_as": "expand",
    "broadcast_to": "expand",
    "iota": "arange",
}


# -- handlers: (interpreter, node, args, kwargs, fake output) -> Val ------------------------------------------


def _cast(it: Interpreter, node, args, kwargs, out) -> Val:
    v = it.operand(args[0])
    if len(v.shape) != out.dim():
        raise Refused("a cast that changes the shape")
    if out.dtype == v.dtype:
        return v
    if kind(out.dtype) == "bool":
        return Val(v.shape, out.dtype, keep=v.formula())
    return Val(v.shape, out.dtype, pieces=_pieces(v.as_pieces(out.dtype)))


def _factory(fill):
    def handler(it, node, args, kwargs, out):
        return constant(tuple(out.shape), out.dtype, it.scalar(fill(args, kwargs)))

    return handler


def _arange(it, node, args, kwargs, out) -> Val:
    if kind(out.dtype) != "int":
        raise Refused("a floating-point arange in a mask")
    if isinstance(node.target, torch._ops.OpOverload) and node.target.overloadpacket is prims.iota:
        start, step = kwargs.get("start", 0), kwargs.get("step", 1)
    else:
        numbers = [a for a in args if not isinstance(a, (torch.dtype, torch.device))]
        start = kwargs.get("start", numbers[0] if len(numbers) > 1 else 0)
        step = kwargs.get("step", numbers[2] if len(numbers) > 2 else 1)
    start, step = it.scalar(start), it.scalar(step)
    if as_int(step) is None or isinstance(start, (float, torch.SymFloat)):
        raise Refused("an arange whose start or step is not an integer")
    return Val((out.shape[0],), out.dtype, pieces=((True, Lin(((0, as_int(step)),), start)),))


def _binary(op_int, op_float):
    def handler(it, node, args, kwargs, out) -> Val:
        a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
        alpha = _arg(args, kwargs, 2, ("alpha",), 1)
        if alpha != 1:
            if not isinstance(alpha, int):
                raise Refused("add / sub with a non-integer alpha")
            b = _combine(b, scalar_val(alpha), tuple(b.shape), out.dtype, _lin_product, operator.mul)
        return _combine(a, b, tuple(out.shape), out.dtype, op_int, op_float)

    return handler


def _combine(a: Val, b: Val, shape: tuple, dtype: torch.dtype, op_int, op_float) -> Val:
    """The elementwise ``op(a, b)`` in ``dtype`` (``op_int`` on affine forms, ``op_float`` on rounded floats)."""
    a, b = broadcast(a, shape), broadcast(b, shape)
    k = kind(dtype)
    if k == "bool":
        raise Refused("arithmetic on bool masks")
    pieces = []
    for ca, pa in a.as_pieces(dtype):
        for cb, pb in b.as_pieces(dtype):
            c = conj(ca, cb)
            if c is not False:
                pieces.append((c, op_int(pa, pb) if k == "int" else _float_op(op_float, pa, pb, dtype)))
    return make(shape, dtype, pieces)


def _lin_product(x: Lin, y: Lin) -> Lin:
    if x.coef and y.coef:
        raise Refused("a product of indices in a mask")
    if x.coef or y.coef:
        lin, c = (x, y) if x.coef else (y, x)
        k = c.constant()
        if k is None:
            raise Refused("a product of a symbolic size and an index in a mask")
        return lin.scaled(k)
    return Lin(const=x.const * y.const)


def _mul(it, node, args, kwargs, out) -> Val:
    a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
    return _combine(a, b, tuple(out.shape), out.dtype, _lin_product, operator.mul)


def _div(it, node, args, kwargs, out) -> Val:
    if kwargs.get("rounding_mode") is not None or len(args) > 2:
        raise Refused("floor division in a mask")

    def int_div(x, y):
        raise Refused("integer division in a mask")

    a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
    return _combine(a, b, tuple(out.shape), out.dtype, int_div, operator.truediv)


def _rsub(it, node, args, kwargs, out) -> Val:
    a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
    alpha = _arg(args, kwargs, 2, ("alpha",), 1)
    if alpha != 1:
        raise Refused("rsub with alpha in a mask")
    return _combine(b, a, tuple(out.shape), out.dtype, operator.sub, operator.sub)


def _unary(op_lin, op_float):
    def handler(it, node, args, kwargs, out) -> Val:
        v = it.operand(args[0])
        if kind(out.dtype) == "bool":
            raise Refused("arithmetic on bool masks")
        pieces = []
        for c, p in v.as_pieces(out.dtype):
            pieces.extend(op_lin(c, p) if isinstance(p, Lin) else [(c, op_float(p))])
        return make(tuple(v.shape), out.dtype, pieces)

    return handler


def _abs_lin(c, p: Lin):
    return [(conj(c, ge(p, Lin())), p), (conj(c, gt(Lin(), p)), -p)]


def _refuse(reason: str):
    def handler(it, node, args, kwargs, out):
        raise Refused(reason)

    return handler


_COMPARE = {
    "lt": lambda a, b: gt(b, a),
    "le": lambda a, b: ge(b, a),
    "gt": gt,
    "ge": ge,
    "eq": lambda a, b: conj(ge(a, b), ge(b, a)),
    "ne": lambda a, b: nonzero(a - b),
}


def _compare(name):
    lin_cmp = _COMPARE[name]
    float_cmp = {"lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}.get(
        name, operator.eq if name == "eq" else operator.ne
    )

    def handler(it, node, args, kwargs, out) -> Val:
        a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
        shape = tuple(out.shape)
        a, b = broadcast(a, shape), broadcast(b, shape)
        common = _promoted(a, b)
        if kind(common) == "float":
            for v in (a, b):
                if kind(v.dtype) == "int" and any(p.coef for _, p in v.pieces):
                    raise Refused("a float literal compared with an index in a mask (write an integer)")
        else:
            common = torch.int64
        parts = []
        for ca, pa in a.as_pieces(common):
            for cb, pb in b.as_pieces(common):
                test = lin_cmp(pa, pb) if kind(common) == "int" else float_cmp(pa, pb)
                parts.append(conj(ca, cb, test))
        return Val(shape, torch.bool, keep=disj(*parts))

    return handler


def _promoted(a: Val, b: Val) -> torch.dtype:
    """The dtype torch compares ``a`` and ``b`` in (a Python number promotes as one)."""

    def dummy(v):
        if v.scalar:
            return {"bool": True, "int": 1, "float": 1.0}[kind(v.dtype)]
        return torch.empty((), dtype=v.dtype) if not v.shape else torch.empty((1,), dtype=v.dtype)

    return torch.result_type(dummy(a), dummy(b))


def _logic(op):
    def handler(it, node, args, kwargs, out) -> Val:
        a, b = it.operand(args[0]), it.operand(_arg(args, kwargs, 1, ("other",)))
        if kind(out.dtype) != "bool":
            raise Refused("bitwise arithmetic on integer masks")
        shape = tuple(out.shape)
        fa, fb = broadcast(a, shape).formula(), broadcast(b, shape).formula()
        return Val(shape, torch.bool, keep=op(fa, fb))

    return handler


def _not(it, node, args, kwargs, out) -> Val:
    v = it.operand(args[0])
    if kind(out.dtype) != "bool":
        raise Refused("bitwise not on an integer mask")
    return Val(tuple(v.shape), torch.bool, keep=neg(v.formula()))


def _select_values(cond: Val, x: Val, y: Val, out) -> Val:
    """``where(cond, x, y)``."""
    shape, dtype = tuple(out.shape), out.dtype
    c = broadcast(cond, shape).formula()
    x, y = broadcast(x, shape), broadcast(y, shape)
    if kind(dtype) == "bool":
        return Val(shape, dtype, keep=disj(conj(c, x.formula()), conj(neg(c), y.formula())))
    pieces = [(conj(c, cx), p) for cx, p in x.as_pieces(dtype)]
    pieces += [(conj(neg(c), cy), p) for cy, p in y.as_pieces(dtype)]
    return make(shape, dtype, pieces)


def _where(it, node, args, kwargs, out) -> Val:
    if node.op == "call_method":  # x.where(cond, y)
        x, cond, y = args[0], _arg(args, kwargs, 1, ("condition",)), _arg(args, kwargs, 2, ("other", "y"))
    else:
        cond, x, y = args[0], _arg(args, kwargs, 1, ("self", "input", "x")), _arg(args, kwargs, 2, ("other", "y"))
    return _select_values(it.operand(cond), it.operand(x), it.operand(y), out)


def _masked_fill(it, node, args, kwargs, out) -> Val:
    x, m, v = args[0], _arg(args, kwargs, 1, ("mask",)), _arg(args, kwargs, 2, ("value",))
    return _select_values(it.operand(m), it.operand(v), it.operand(x), out)


def _triangle(lower: bool):
    def handler(it, node, args, kwargs, out) -> Val:
        v = it.operand(args[0])
        k = it.scalar(_arg(args, kwargs, 1, ("diagonal",), 0))
        if not isinstance(k, (int, torch.SymInt)) or len(v.shape) < 2:
            raise Refused("tril / triu with a non-integer offset")
        r = len(v.shape)
        d = var(r - 1) - var(r - 2)  # j - i
        keep = ge(Lin(const=k), d) if lower else ge(d, Lin(const=k))
        zero = constant((), v.dtype, False if kind(v.dtype) == "bool" else 0)
        return _select_values(Val(tuple(v.shape), torch.bool, keep=keep), v, zero, out)

    return handler


# -- views -----------------------------------------------------------------------------------------------------


def _view(it, node, args, kwargs, out) -> Val:
    """Reshapes that only insert or drop size-1 dims (view, reshape, squeeze, unsqueeze, flatten of 1s)."""
    v = it.operand(args[0])
    shape = tuple(out.shape)
    if v.dtype != out.dtype:
        raise Refused("a view that reinterprets a mask's dtype")
    ins = [k for k, s in enumerate(v.shape) if not is_one(s)]
    outs = [k for k, s in enumerate(shape) if not is_one(s)]
    if len(ins) != len(outs) or not all(known(v.shape[a] == shape[b]) for a, b in zip(ins, outs)):
        raise Refused("a reshape that merges or splits dims of a mask")
    m = {k: Lin() for k in range(len(v.shape))}
    m.update({a: var(b) for a, b in zip(ins, outs)})
    return v.remap(shape, m)


def _expand(it, node, args, kwargs, out) -> Val:
    return broadcast(it.operand(args[0]), tuple(out.shape))


def _permute(it, node, args, kwargs, out) -> Val:
    """permute, transpose, t: ``out`` dim k is ``x`` dim ``perm[k]``."""
    v = it.operand(args[0])
    r = len(v.shape)
    name = _name(node)
    if name == "t":
        perm = [1, 0] if r == 2 else list(range(r))
    elif name == "transpose":
        d0, d1 = (it.scalar(a) % r for a in (args[1], args[2]))
        perm = list(range(r))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    else:
        dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:] or kwargs.get("dims")
        perm = [it.scalar(d) % r for d in dims]
    return v.remap(tuple(out.shape), {perm[k]: var(k) for k in range(r)})


def _start(start, size):
    """Where a slice (or an index) starts: ``None`` -> 0, negative -> from the end; refused if unknown."""
    if start is None:
        return 0
    if not isinstance(start, (int, torch.SymInt)):
        raise Refused("a slice or index that is not an integer")
    if known(start >= 0):
        return start
    if known(start < 0):
        if known(size + start >= 0):
            return size + start
        if known(size + start <= 0):
            return 0
    raise Refused("a slice or index whose position the proof cannot place (symbolic offset of unknown sign)")


def _step(step) -> int:
    step = 1 if step is None else as_int(step)
    if step is None or step < 1:
        raise Refused("a slice with a symbolic or non-positive step")
    return step


def _slice(it, node, args, kwargs, out) -> Val:
    v = it.operand(args[0])
    r = len(v.shape)
    dim = it.scalar(_arg(args, kwargs, 1, ("dim",), 0)) % r
    start = _arg(args, kwargs, 2, ("start",))
    start = _start(None if start is None else it.scalar(start), v.shape[dim])
    step = _step(it.scalar(_arg(args, kwargs, 4, ("step",), 1)))
    m = {k: var(k) for k in range(r)}
    m[dim] = Lin(((dim, step),), start)
    return v.remap(tuple(out.shape), m)


def _narrow(it, node, args, kwargs, out) -> Val:
    v = it.operand(args[0])
    r = len(v.shape)
    dim = it.scalar(args[1]) % r
    m = {k: var(k) for k in range(r)}
    m[dim] = Lin(((dim, 1),), _start(it.scalar(args[2]), v.shape[dim]))
    return v.remap(tuple(out.shape), m)


def _select(it, node, args, kwargs, out) -> Val:
    v = it.operand(args[0])
    r = len(v.shape)
    dim = it.scalar(_arg(args, kwargs, 1, ("dim",))) % r
    index = _start(it.scalar(_arg(args, kwargs, 2, ("index",))), v.shape[dim])
    m = {k: var(k if k < dim else k - 1) for k in range(r) if k != dim}
    m[dim] = Lin(const=index)
    return v.remap(tuple(out.shape), m)


def _affine(v: Val, what: str) -> Lin:
    """The one affine form of an integer value (an index from ``arange``), or `Refused`."""
    if v.keep is not None or kind(v.dtype) != "int" or len(v.pieces) != 1 or v.pieces[0][0] is not True:
        raise Refused(f"{what} of a tensor that is not an affine function of the position")
    return v.pieces[0][1]


def _diff(it, node, args, kwargs, out) -> Val:
    """``torch.diff(x, dim=d, prepend=p)`` of affine integer indices (HF's packed-sequence check diffs the position
    ids): the coefficient of ``x_d`` past the first element, ``x - p`` at index 0 with a prepend; ``n = 1`` and no
    ``append``."""
    if _arg(args, kwargs, 1, ("n",), 1) != 1 or _arg(args, kwargs, 4, ("append",)) is not None:
        raise Refused("torch.diff with n > 1 or append in a mask")
    v = it.operand(args[0])
    shape = tuple(out.shape)
    dim = it.scalar(_arg(args, kwargs, 2, ("dim",), -1)) % len(shape)
    lin = _affine(v, "torch.diff")
    step = Lin(const=dict(lin.coef).get(dim, 0))
    prepend = _arg(args, kwargs, 3, ("prepend",))
    if prepend is None:
        return Val(shape, out.dtype, pieces=((True, step),))
    if len(tensor_of(prepend).shape) != len(shape) or not is_one(tensor_of(prepend).shape[dim]):
        raise Refused("torch.diff with a prepend of more than one element in a mask")
    first = {k: var(k) for k in range(len(shape))}
    first[dim] = Lin()
    at_first = lin.subst(first) - _affine(it.operand(prepend), "torch.diff").subst(first)
    is_first = atom(-var(dim))  # x_d <= 0
    return Val(shape, out.dtype, pieces=_pieces(((is_first, at_first), (neg(is_first), step))))


def _cumsum(it, node, args, kwargs, out) -> Val:
    """``cumsum`` along ``dim`` of a tensor that is one integer constant ``c``: ``c·(x_dim + 1)`` (HF's packed-sequence
    ids are the cumsum of an all-False tensor; anything else is refused)."""
    v = it.operand(args[0])
    shape = tuple(out.shape)
    dim = it.scalar(_arg(args, kwargs, 1, ("dim",))) % len(shape)
    pieces = [(c, p) for c, p in v.as_pieces(torch.int64) if c is not False]
    if kind(out.dtype) != "int" or len(pieces) != 1 or pieces[0][0] is not True or pieces[0][1].constant() is None:
        raise Refused("cumsum of a tensor that is not constant in a mask")
    return Val(shape, out.dtype, pieces=((True, (var(dim) + Lin(const=1)).scaled(pieces[0][1].constant())),))


def _gather(it, v: Val, items: tuple, out) -> Val:
    """``x[t_0, .., t_{r-1}]``, every dim indexed by an integer tensor (HF's padding function reads
    ``mask[batch_idx, kv_idx]``): each index must be one affine form of the result's position, provably within its
    dim (a negative or out-of-range index is refused), and the value is ``x`` at those forms."""
    shape = tuple(out.shape)
    m = {}
    for k, x in enumerate(items):
        lin = _affine(broadcast(it.operand(x), shape), "indexing a mask by a tensor")
        lo = hi = lin.const
        for d, a in lin.coef:
            span = a * (shape[d] - 1)
            lo, hi = (lo, hi + span) if a > 0 else (lo + span, hi)
        if not (known(lo >= 0) and known(hi <= v.shape[k] - 1)):
            raise Refused("indexing a mask by a tensor that may be negative or out of range")
        m[k] = lin
    return v.remap(shape, m)


def _getitem(it, node, args, kwargs, out) -> Val:
    """``x[...]`` with None, Ellipsis, slices and integers, or with an integer tensor for every dim (`_gather`;
    any other tensor index is refused)."""
    v = it.operand(args[0])
    items = args[1] if isinstance(args[1], tuple) else (args[1],)
    tensors = [meta_val(x) if isinstance(x, fx.Node) else None for x in items]
    if len(items) == len(v.shape) and all(
        isinstance(t, torch.Tensor) and t.dim() > 0 and kind(t.dtype) == "int" for t in tensors
    ):
        return _gather(it, v, items, out)
    consumed = sum(1 for x in items if x is not None and x is not Ellipsis)
    if sum(x is Ellipsis for x in items) > 1:
        raise Refused("an index with two ellipses")
    full = []
    for x in items:
        full.extend([slice(None)] * (len(v.shape) - consumed) if x is Ellipsis else [x])
    if Ellipsis not in items:
        full.extend([slice(None)] * (len(v.shape) - consumed))
    m, k_in, k_out = {}, 0, 0
    for x in full:
        if x is None:
            k_out += 1
        elif isinstance(x, slice):
            start = it.scalar(x.start) if x.start is not None else None
            step = _step(it.scalar(x.step) if x.step is not None else 1)
            m[k_in] = Lin(((k_out, step),), _start(start, v.shape[k_in]))
            k_in, k_out = k_in + 1, k_out + 1
        elif isinstance(x, (bool, torch.Tensor, list)) or (isinstance(x, fx.Node) and not is_scalar(meta_val(x))):
            raise Refused("indexing a mask by a tensor or a bool")
        else:
            m[k_in] = Lin(const=_start(it.scalar(x), v.shape[k_in]))
            k_in += 1
    return v.remap(tuple(out.shape), m)


_CASTS = (
    "to",
    "_to_copy",
    "convert_element_type",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "bool",
    "int",
    "long",
    "short",
    "byte",
    "char",
    "contiguous",
    "clone",
    "detach",
    "alias",
    "lift_fresh_copy",
    "cpu",
    "cuda",
)

_HANDLERS = {
    **dict.fromkeys(_CASTS, _cast),
    "ones": _factory(lambda a, k: 1),
    "ones_like": _factory(lambda a, k: 1),
    "new_ones": _factory(lambda a, k: 1),
    "zeros": _factory(lambda a, k: 0),
    "zeros_like": _factory(lambda a, k: 0),
    "new_zeros": _factory(lambda a, k: 0),
    "full": _factory(lambda a, k: _arg(a, k, 1, ("fill_value",))),
    "full_like": _factory(lambda a, k: _arg(a, k, 1, ("fill_value",))),
    "new_full": _factory(lambda a, k: _arg(a, k, 2, ("fill_value",))),
    "scalar_tensor": _factory(lambda a, k: a[0]),
    "tensor": _factory(lambda a, k: a[0]),
    "fill": _factory(lambda a, k: _arg(a, k, 1, ("value",))),
    "arange": _arange,
    "add": _binary(operator.add, operator.add),
    "sub": _binary(operator.sub, operator.sub),
    "rsub": _rsub,
    "mul": _mul,
    "div": _div,
    "neg": _unary(lambda c, p: [(c, -p)], operator.neg),
    "abs": _unary(_abs_lin, abs),
    "floor_divide": _refuse("floor division in a mask"),
    "remainder": _refuse("a remainder (modulo) in a mask"),
    "fmod": _refuse("a remainder (modulo) in a mask"),
    **{name: _compare(name) for name in _COMPARE},
    "and": _logic(conj),
    "or": _logic(disj),
    "xor": _logic(lambda a, b: disj(conj(a, neg(b)), conj(neg(a), b))),
    "not": _not,
    "where": _where,
    "masked_fill": _masked_fill,
    "tril": _triangle(lower=True),
    "triu": _triangle(lower=False),
    "view": _view,
    "expand": _expand,
    "permute": _permute,
    "transpose": _permute,
    "t": _permute,
    "slice": _slice,
    "narrow": _narrow,
    "select": _select,
    "getitem": _getitem,
    "diff": _diff,
    "cumsum": _cumsum,
}
