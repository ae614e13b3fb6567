"""Named ops. Each computes with ``jax.numpy`` and reports itself through :func:`meshjax.context.emit`.

Example::

    >>> import jax.numpy as jnp
    >>> x = named(jnp.ones((2, 4)), "batch embed")
    >>> w = named(jnp.ones((4, 8)), "embed mlp")
    >>> einsum("batch embed, embed mlp -> batch mlp", x, w).sizes
    {'batch': 2, 'mlp': 8}
    >>> softmax(x, "embed").sizes
    {'batch': 2, 'embed': 4}
"""

from __future__ import annotations

import builtins
import math
import string
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from meshjax.context import compute, emit
from meshjax.errors import EinsumError, ShapeError
from meshjax.graph import LINEAR, IndexForm, OpFacts
from meshjax.named import DimsLike, NamedArray, check_sizes, format_dims, named, parse_dims

__all__ = [
    "einsum", "elementwise", "exp", "log", "tanh", "relu", "gelu", "silu", "sigmoid", "square",
    "sqrt", "rsqrt", "maximum", "minimum", "where", "mask", "cast", "greater_equal", "sum", "mean", "max",
    "softmax", "logsumexp", "layer_norm", "rms_norm", "embed", "cross_entropy", "split_dim",
    "merge_dims", "rename", "arange", "parse_einsum", "attention",
]


def _prod(values) -> int:
    return int(math.prod(int(v) for v in values))


def _loop_of(arrays: Sequence[NamedArray], context: str) -> tuple[tuple[str, int], ...]:
    return tuple(check_sizes(arrays, context=context).items())


# --- einsum ----------------------------------------------------------------------------------


def parse_einsum(spec: str) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]:
    """``"batch embed, embed mlp -> batch mlp"`` -> ``((("batch","embed"),("embed","mlp")), ("batch","mlp"))``.

    Raises :class:`EinsumError` naming the spec and the offending dim.
    """
    if spec.count("->") != 1:
        raise EinsumError(f"einsum {spec!r}: needs exactly one '->'")
    lhs, rhs = spec.split("->")
    terms = [t.strip() for t in lhs.split(",")]
    try:
        inputs = tuple(parse_dims(t, what=f"einsum {spec!r} operand") for t in terms)
        output = parse_dims(rhs.strip(), what=f"einsum {spec!r} result")
    except ShapeError as err:
        raise EinsumError(str(err)) from None
    seen = {d for term in inputs for d in term}
    for dim in output:
        if dim not in seen:
            raise EinsumError(f"einsum {spec!r}: result dim {dim!r} is in no operand")
    return inputs, output


def einsum(spec: str, *operands: NamedArray, name: str | None = None, precision=None) -> NamedArray:
    """Contract named arrays by a named spec. Operands may hold their dims in any order.

    >>> x = named(jnp.ones((3, 2)), "embed batch")
    >>> w = named(jnp.ones((3, 5)), "embed mlp")
    >>> einsum("batch embed, embed mlp -> batch mlp", x, w).shape
    (2, 5)
    """
    terms, out_dims = parse_einsum(spec)
    if len(terms) != len(operands):
        raise EinsumError(f"einsum {spec!r}: {len(terms)} operands in the spec, {len(operands)} given")
    for i, (term, operand) in enumerate(zip(terms, operands)):
        if not isinstance(operand, NamedArray):
            raise EinsumError(f"einsum {spec!r}: operand {i} is not a NamedArray")
        if sorted(term) != sorted(operand.dims):
            missing = [d for d in term if d not in operand.dims]
            extra = [d for d in operand.dims if d not in term]
            detail = "; ".join(
                part
                for part in (
                    f"it lacks dim {', '.join(map(repr, missing))}" if missing else "",
                    f"it has dim {', '.join(map(repr, extra))} the spec does not name" if extra else "",
                )
                if part
            )
            raise EinsumError(
                f"einsum {spec!r}: operand {i} has dims {format_dims(operand.dims)!r}, "
                f"the spec says {format_dims(term)!r} ({detail})"
            )
    loop = _loop_of(operands, f"einsum {spec!r}")
    letters = dict(zip((d for d, _ in loop), string.ascii_letters))
    subscripts = ",".join("".join(letters[d] for d in op.dims) for op in operands)
    subscripts += "->" + "".join(letters[d] for d in out_dims)
    operands, value = compute(
        "einsum", name, operands, lambda ops: jnp.einsum(subscripts, *(op.value for op in ops), precision=precision)
    )
    reduced = tuple(d for d, _ in loop if d not in out_dims)
    index = IndexForm(
        loop=loop,
        operands=tuple(op.dims for op in operands),
        result=out_dims,
        reduced=reduced,
        flops=float((2 if reduced else 1) * _prod(s for _, s in loop)),
    )
    facts = OpFacts.reading(len(operands))  # each operand's gradient contracts the others
    return emit("einsum", operands, NamedArray(value, out_dims), index, {"spec": spec}, name, facts=facts)


# --- elementwise -----------------------------------------------------------------------------

# Each elementwise op with what its backward pass reads (OpFacts): sums and selections read
# nothing; exp, tanh, sigmoid, sqrt and rsqrt are differentiated through their own result; JAX
# differentiates gelu's tanh approximation through ``tanh`` and silu through ``sigmoid`` and keeps
# that value besides the input (one residual of the result's size); the rest read their operands.
# In a scan every residual jax.vjp saves is stacked (what jax's saved_residuals lists for the op,
# checked in tests/test_evaluate.py): gelu 4 (x*x*x, tanh, 1 - tanh^2, ...), silu 2, tanh 1.
_READS_OPERANDS = None  # filled per call: every operand the op got
_ELEMENTWISE: dict[str, tuple[Callable, OpFacts | None]] = {
    "add": (jnp.add, LINEAR),
    "subtract": (jnp.subtract, LINEAR),
    "multiply": (jnp.multiply, _READS_OPERANDS),
    "divide": (jnp.divide, _READS_OPERANDS),
    "power": (jnp.power, _READS_OPERANDS),
    "maximum": (jnp.maximum, _READS_OPERANDS),
    "minimum": (jnp.minimum, _READS_OPERANDS),
    "greater_equal": (jnp.greater_equal, LINEAR),
    "where": (jnp.where, LINEAR),
    "negative": (jnp.negative, LINEAR),
    "exp": (jnp.exp, OpFacts(saves_result=True)),
    "log": (jnp.log, _READS_OPERANDS),
    "tanh": (jnp.tanh, OpFacts(saves_result=True, scan_residuals=1)),
    "relu": (jax.nn.relu, _READS_OPERANDS),
    "gelu": (jax.nn.gelu, OpFacts(saves=(0,), residuals=1, scan_residuals=4)),
    "silu": (jax.nn.silu, OpFacts(saves=(0,), residuals=1, scan_residuals=2)),
    "sigmoid": (jax.nn.sigmoid, OpFacts(saves_result=True)),
    "square": (jnp.square, _READS_OPERANDS),
    "sqrt": (jnp.sqrt, OpFacts(saves_result=True)),
    "rsqrt": (jax.lax.rsqrt, OpFacts(saves_result=True)),
}


def _broadcast_to(array: NamedArray, dims: tuple[str, ...]) -> jax.Array:
    present = tuple(d for d in dims if d in array.dims)
    value = array.align_to(present)
    return jnp.expand_dims(value, [i for i, d in enumerate(dims) if d not in array.dims])


def elementwise(fn: str | Callable, *args, name: str | None = None, facts: OpFacts | None = None) -> NamedArray:
    """Apply an elementwise function, broadcasting named operands by name.

    ``fn`` is a name from the built-in table (``"add"``, ``"gelu"``...) or any elementwise
    callable. Python scalars are allowed; the result's dims are the first operand's, then the
    new ones in order of appearance. ``facts`` says what the backward pass of a callable reads
    (default: all its named operands, as ``jax.vjp`` of an arbitrary function keeps its inputs);
    the built-in ops declare their own.

    >>> a = named(jnp.ones((2,)), "batch"); b = named(jnp.ones((3,)), "embed")
    >>> elementwise("add", a, b).dims
    ('batch', 'embed')
    """
    if isinstance(fn, str):
        if fn not in _ELEMENTWISE:
            raise ValueError(f"unknown elementwise op {fn!r}; known: {', '.join(sorted(_ELEMENTWISE))}")
        kind, (func, declared) = fn, _ELEMENTWISE[fn]
        facts = facts or declared
    else:
        kind, func = getattr(fn, "__name__", "elementwise"), fn
    arrays = [a for a in args if isinstance(a, NamedArray)]
    if not arrays:
        raise ShapeError(f"{kind}: needs at least one NamedArray operand")
    for a in args:
        if not isinstance(a, NamedArray) and np.ndim(a) != 0:
            raise ShapeError(f"{kind}: a plain array of shape {np.shape(a)} has no dim names; wrap it with named()")
    loop = _loop_of(arrays, kind)
    out_dims = tuple(d for d, _ in loop)

    def run(operands: list[NamedArray]):
        pinned = iter(operands)
        full = [_broadcast_to(next(pinned), out_dims) if isinstance(a, NamedArray) else a for a in args]
        return func(*full)

    arrays, value = compute(kind, name, arrays, run)
    index = IndexForm(
        loop=loop,
        operands=tuple(a.dims for a in arrays),
        result=out_dims,
        flops=float(_prod(s for _, s in loop)),
    )
    if facts is None:
        # A product or quotient by a Python number reads nothing back; otherwise every operand.
        scaled = kind in ("multiply", "divide") and len(arrays) == 1
        facts = LINEAR if scaled else OpFacts.reading(len(arrays))
    return emit(kind, arrays, NamedArray(value, out_dims), index, {}, name, facts=facts)


def _unary(fn_name: str):
    def op(x: NamedArray, *, name: str | None = None) -> NamedArray:
        return elementwise(fn_name, x, name=name)

    op.__name__ = fn_name
    op.__doc__ = f"Elementwise ``{fn_name}`` of a named array."
    return op


exp = _unary("exp")
log = _unary("log")
tanh = _unary("tanh")
relu = _unary("relu")
gelu = _unary("gelu")
silu = _unary("silu")
sigmoid = _unary("sigmoid")
square = _unary("square")
sqrt = _unary("sqrt")
rsqrt = _unary("rsqrt")


def maximum(a, b, *, name: str | None = None) -> NamedArray:
    """Elementwise maximum, broadcasting by name."""
    return elementwise("maximum", a, b, name=name)


def minimum(a, b, *, name: str | None = None) -> NamedArray:
    """Elementwise minimum, broadcasting by name."""
    return elementwise("minimum", a, b, name=name)


def greater_equal(a, b, *, name: str | None = None) -> NamedArray:
    """Elementwise ``a >= b``, broadcasting by name."""
    return elementwise("greater_equal", a, b, name=name)


def _select(a, b, cond):
    return jnp.where(cond, a, b)


_select.__name__ = "where"


def where(cond, a, b, *, name: str | None = None) -> NamedArray:
    """``cond ? a : b``, broadcasting by name. The result's dims are ``a``'s, then ``b``'s new
    ones, then ``cond``'s: a mask never reorders the values it selects from.

    >>> s = named(jnp.zeros((2, 3, 3)), "heads seq key_seq")
    >>> keep = named(jnp.tri(3, dtype=bool), "seq key_seq")
    >>> where(keep, s, -1e9).dims
    ('heads', 'seq', 'key_seq')
    """
    return elementwise(_select, a, b, cond, name=name)


def mask(x: NamedArray, keep, fill: float = -1e9, *, name: str | None = None) -> NamedArray:
    """``x`` where ``keep`` is true, else ``fill`` (attention masks); the result has ``x``'s dims
    in ``x``'s order, plus any of ``keep``'s it lacks.

    >>> scores = named(jnp.ones((2, 3, 3)), "heads seq key_seq")
    >>> mask(scores, named(jnp.tri(3, dtype=bool), "seq key_seq")).dims
    ('heads', 'seq', 'key_seq')
    """
    return where(keep, x, fill, name=name)


def cast(x: NamedArray, dtype, *, name: str | None = None) -> NamedArray:
    """Convert to ``dtype``."""
    dtype = jnp.dtype(dtype)
    fn = lambda v: v.astype(dtype)  # noqa: E731
    fn.__name__ = "cast"
    return elementwise(fn, x, name=name, facts=LINEAR)


# --- reductions ------------------------------------------------------------------------------


def _reduce(kind: str, x: NamedArray, dims: DimsLike, func, reduction: str, name, stats=0, saves=True) -> NamedArray:
    over = parse_dims(dims)
    for d in over:
        x.size(d)  # names a missing dim
    keep = tuple(d for d in x.dims if d not in over)
    axes = tuple(x.axis(d) for d in over)
    (x,), value = compute(kind, name, [x], lambda ops: func(ops[0].value, axis=axes))
    loop = tuple(x.sizes.items())
    index = IndexForm(
        loop=loop,
        operands=(x.dims,),
        result=keep,
        reduced=over,
        reduction=reduction,
        flops=float(_prod(x.shape) * builtins.max(1, stats)),
    )
    # sum and mean read nothing back; max and log-sum-exp read their operand.
    facts = OpFacts(saves=(0,) if saves else (), reduction=True)
    return emit(kind, [x], NamedArray(value, keep), index, {"dims": over}, name, facts=facts)


def sum(x: NamedArray, dims: DimsLike, *, name: str | None = None) -> NamedArray:  # noqa: A001
    """Sum over the named dims.

    >>> sum(named(jnp.ones((2, 3)), "batch embed"), "embed").value.tolist()
    [3.0, 3.0]
    """
    return _reduce("sum", x, dims, jnp.sum, "sum", name, saves=False)


def mean(x: NamedArray, dims: DimsLike, *, name: str | None = None) -> NamedArray:
    """Mean over the named dims."""
    return _reduce("mean", x, dims, jnp.mean, "sum", name, saves=False)


def max(x: NamedArray, dims: DimsLike, *, name: str | None = None) -> NamedArray:  # noqa: A001
    """Maximum over the named dims."""
    return _reduce("max", x, dims, jnp.max, "max", name)


def logsumexp(x: NamedArray, dim: str, *, name: str | None = None) -> NamedArray:
    """``log(sum(exp(x)))`` over ``dim``, computed stably."""
    return _reduce("logsumexp", x, dim, jax.nn.logsumexp, "lse", name, stats=4)


def softmax(x: NamedArray, dim: str, *, name: str | None = None) -> NamedArray:
    """Softmax over ``dim``; the result keeps every dim."""
    axis = x.axis(dim)
    (x,), value = compute("softmax", name, [x], lambda ops: jax.nn.softmax(ops[0].value, axis=axis))
    index = IndexForm(
        loop=tuple(x.sizes.items()),
        operands=(x.dims,),
        result=x.dims,
        stats=((dim, 2),),
        flops=float(5 * _prod(x.shape)),
    )
    # JAX differentiates softmax through the unnormalised exponentials (one residual of the
    # result's size) and the per-row sums, not through the result.
    facts = OpFacts(residuals=1)
    return emit("softmax", [x], NamedArray(value, x.dims), index, {"dim": dim}, name, facts=facts)


def _norm(kind: str, x: NamedArray, dim: str, scale, bias, eps: float, name) -> NamedArray:
    axis = x.axis(dim)
    params = [p for p in (scale, bias) if p is not None]
    for p in params:
        if p.dims != (dim,):
            raise ShapeError(f"{kind}: scale/bias must have dims {dim!r}, got {format_dims(p.dims)!r}")
        if p.size(dim) != x.size(dim):
            raise ShapeError(f"{kind}: dim {dim!r} has size {x.size(dim)} and {p.size(dim)}")
    shape = [1] * len(x.dims)
    shape[axis] = x.size(dim)

    def run(operands: list[NamedArray]):
        x, *rest = operands
        v = x.value.astype(jnp.promote_types(x.dtype, jnp.float32))
        if kind == "layer_norm":
            centered = v - jnp.mean(v, axis=axis, keepdims=True)
            normed = centered * jax.lax.rsqrt(jnp.mean(centered**2, axis=axis, keepdims=True) + eps)
        else:
            normed = v * jax.lax.rsqrt(jnp.mean(v**2, axis=axis, keepdims=True) + eps)
        rest = iter(rest)
        if scale is not None:
            normed = normed * next(rest).value.reshape(shape)
        if bias is not None:
            normed = normed + next(rest).value.reshape(shape)
        return normed.astype(x.dtype)

    (x, *params), value = compute(kind, name, [x, *params], run)
    index = IndexForm(
        loop=tuple(x.sizes.items()),
        operands=(x.dims, *((dim,) for _ in params)),
        result=x.dims,
        stats=((dim, 2 if kind == "layer_norm" else 1),),
        flops=float(8 * _prod(x.shape)),
    )
    # Inside a scan JAX's residuals of a norm are stacked: the centred / scaled input and the
    # normalised value besides the input (two more of its size), in float32; below float32 the
    # upcast input is a third (float32 copies of x, counted in x's itemsize).
    upcast = 4 / x.dtype.itemsize
    facts = OpFacts.reading(1 + len(params), scan_residuals=2 if upcast <= 1 else 3 * upcast)
    return emit(kind, [x, *params], NamedArray(value, x.dims), index, {"dim": dim, "eps": eps}, name, facts=facts)


def layer_norm(x, dim: str, scale=None, bias=None, *, eps: float = 1e-5, name=None) -> NamedArray:
    """Layer norm over ``dim`` with optional ``scale`` and ``bias`` (each with dims ``dim``)."""
    return _norm("layer_norm", x, dim, scale, bias, eps, name)


def rms_norm(x, dim: str, scale=None, *, eps: float = 1e-6, name=None) -> NamedArray:
    """RMS norm over ``dim`` with an optional ``scale``."""
    return _norm("rms_norm", x, dim, scale, None, eps, name)


# --- embedding and loss ----------------------------------------------------------------------


def _class_dim(op: str, what: str, x: NamedArray, vocab: str) -> None:
    if vocab not in x.dims:
        raise ShapeError(
            f"{op}: the {what} have no dim {vocab!r} (dims: {format_dims(x.dims)!r}); "
            f"name the class dim with {op}(..., vocab='<dim>')"
        )


def embed(ids: NamedArray, table: NamedArray, *, vocab: str = "vocab", name: str | None = None) -> NamedArray:
    """Look up integer ``ids`` in ``table`` along its ``vocab`` dim.

    >>> ids = named(jnp.array([[0, 2]]), "batch seq")
    >>> table = named(jnp.eye(3), "vocab embed")
    >>> embed(ids, table).dims
    ('batch', 'seq', 'embed')
    """
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ShapeError(f"embed: ids must be integers, got {ids.dtype}")
    _class_dim("embed", "table", table, vocab)
    if vocab in ids.dims:
        raise ShapeError(f"embed: ids must not have the {vocab!r} dim")
    rest = tuple(d for d in table.dims if d != vocab)
    clash = set(rest) & set(ids.dims)
    if clash:
        raise ShapeError(f"embed: dims {sorted(clash)} are on both ids and table")
    (ids, table), value = compute(
        "embed", name, [ids, table], lambda ops: jnp.take(ops[1].align_to((vocab, *rest)), ops[0].value, axis=0)
    )
    out_dims = (*ids.dims, *rest)
    loop = (*ids.sizes.items(), *table.sizes.items())
    index = IndexForm(
        loop=tuple(loop),
        operands=(ids.dims, table.dims),
        result=out_dims,
        reduced=(vocab,),
        flops=float(_prod(value.shape)),
    )
    # The gradient scatters into the table at the ids: it reads the ids, not the table.
    facts = OpFacts(saves=(0,))
    return emit("embed", [ids, table], NamedArray(value, out_dims), index, {"vocab": vocab}, name, facts=facts)


def cross_entropy(logits: NamedArray, targets: NamedArray, *, vocab: str = "vocab", name=None) -> NamedArray:
    """Softmax cross-entropy of ``logits`` against integer ``targets``, per position.

    The result has the logits' dims less ``vocab``; ``targets`` has exactly those dims.
    """
    _class_dim("cross_entropy", "logits", logits, vocab)
    keep = tuple(d for d in logits.dims if d != vocab)
    if sorted(targets.dims) != sorted(keep):
        raise ShapeError(
            f"cross_entropy: targets have dims {format_dims(targets.dims)!r}, expected {format_dims(keep)!r}"
        )
    check_sizes([logits, targets], context="cross_entropy")

    def run(operands: list[NamedArray]):
        logits, targets = operands
        v = logits.align_to((*keep, vocab)).astype(jnp.promote_types(logits.dtype, jnp.float32))
        onehot = jax.nn.one_hot(targets.align_to(keep), v.shape[-1], dtype=v.dtype)
        return jax.nn.logsumexp(v, axis=-1) - jnp.sum(v * onehot, axis=-1)

    (logits, targets), value = compute("cross_entropy", name, [logits, targets], run)
    index = IndexForm(
        loop=tuple(logits.sizes.items()),
        operands=(logits.dims, targets.dims),
        result=keep,
        reduced=(vocab,),
        reduction="xent",
        flops=float(6 * _prod(logits.shape)),
    )
    facts = OpFacts.reading(2, reduction=True)
    return emit("cross_entropy", [logits, targets], NamedArray(value, keep), index, {"vocab": vocab}, name, facts=facts)


# --- attention -------------------------------------------------------------------------------


def attention(
    q: NamedArray,
    k: NamedArray,
    v: NamedArray,
    *,
    seq: str = "seq",
    key_seq: str = "key_seq",
    heads: str = "heads",
    kv_heads: str | None = None,
    head_dim: str = "head_dim",
    causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
    block: int | None = None,
    name: str | None = None,
) -> NamedArray:
    """``softmax(q k * scale) v`` over ``key_seq`` per head, as ONE op that keeps no
    ``[..., seq, key_seq]`` tensor (see :mod:`meshjax.flash` for the kernels).

    ``q`` has dims ``seq``, ``heads`` and ``head_dim``; ``k`` and ``v`` have ``key_seq``,
    ``head_dim`` and either ``heads`` or, with grouped key/value heads, ``kv_heads`` (which must
    divide ``heads``; query head ``h`` reads key head ``h // (heads // kv_heads)``). Every other
    dim (``batch``) is on all three. The result has ``q``'s dims. ``scale`` defaults to
    ``1/sqrt(head_dim)``; ``causal`` lets query ``i`` see keys ``0..i``.

    Its loop dims are the batch dims, ``kv_heads`` (or ``heads``), the query heads per key head
    (``group``, kept whole), ``seq``, ``key_seq`` and ``head_dim``, the last two reduced and kept
    whole: a strategy splits batch, heads (key heads with them) and the query sequence, whose
    keys and values then arrive gathered (context parallelism).

    >>> q = named(jnp.ones((2, 8, 4, 16)), "batch seq heads head_dim")
    >>> kv = named(jnp.ones((2, 8, 2, 16)), "batch key_seq kv_heads head_dim")
    >>> attention(q, kv, kv, kv_heads="kv_heads", causal=True).sizes
    {'batch': 2, 'seq': 8, 'heads': 4, 'head_dim': 16}
    """
    from meshjax import flash

    for array, what in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(array, NamedArray):
            raise ShapeError(f"attention: {what} is not a NamedArray")
    kv_dim = kv_heads or heads
    for array, what, needs in ((q, "q", (seq, heads, head_dim)), (k, "k", (key_seq, kv_dim, head_dim)), (v, "v", (key_seq, kv_dim, head_dim))):
        missing = [d for d in needs if d not in array.dims]
        if missing:
            raise ShapeError(f"attention: {what} has dims {format_dims(array.dims)!r}, it lacks dim {missing[0]!r}")
    batch = tuple(d for d in q.dims if d not in (seq, heads, head_dim))
    for array, what in ((k, "k"), (v, "v")):
        if sorted(array.dims) != sorted((*batch, key_seq, kv_dim, head_dim)):
            raise ShapeError(
                f"attention: {what} has dims {format_dims(array.dims)!r}, expected {format_dims((*batch, key_seq, kv_dim, head_dim))!r}"
            )
    if k.sizes != v.sizes:
        raise ShapeError(f"attention: k and v differ in size: {k.sizes} and {v.sizes}")
    check_sizes([q, k, v], context="attention")
    n_heads, n_kv = q.size(heads), k.size(kv_dim)
    if n_heads % n_kv:
        raise ShapeError(f"attention: dim {heads!r} of size {n_heads} is not a multiple of dim {kv_dim!r} of size {n_kv}")
    n_batch = _prod(q.size(d) for d in batch)
    q_order, kv_order = (*batch, seq, heads, head_dim), (*batch, key_seq, kv_dim, head_dim)
    width = flash.DEFAULT_BLOCK if block is None else int(block)

    def run(operands: list[NamedArray]):
        q, k, v = operands
        qv = q.align_to(q_order).reshape(n_batch, q.size(seq), n_heads, -1)
        kv_shape = (n_batch, k.size(key_seq), n_kv, -1)
        out = flash.dot_product_attention(
            qv, k.align_to(kv_order).reshape(kv_shape), v.align_to(kv_order).reshape(kv_shape),
            causal=causal, scale=scale, implementation=implementation, block=width,
        )
        out = out.reshape(*(q.size(d) for d in q_order))
        return jnp.transpose(out, [q_order.index(d) for d in q.dims])

    (q, k, v), value = compute("attention", name, [q, k, v], run)
    # Query heads walk the key heads they read (row-major: heads = kv_heads x group), so a split
    # of heads is a split of kv_heads; ``group`` stays whole.
    grouped = kv_heads is not None
    group = f"{heads}_per_{kv_dim}"
    loop = (
        *((d, q.size(d)) for d in batch),
        (kv_dim, n_kv),
        *(((group, n_heads // n_kv),) if grouped else ()),
        (seq, q.size(seq)),
        (key_seq, k.size(key_seq)),
        (head_dim, q.size(head_dim)),
    )
    walk = {heads: kv_dim}
    q_loop = tuple(walk.get(d, d) for d in q.dims)
    index = IndexForm(
        loop=loop,
        operands=(q_loop, k.dims, v.dims),
        result=q_loop,
        reduced=(key_seq, head_dim),
        whole=(key_seq, head_dim, *((group,) if grouped else ())),
        flops=float(4 * _prod(s for _, s in loop)),  # q k and p v
    )
    attrs = {
        "causal": causal, "scale": scale, "seq": seq, "key_seq": key_seq, "heads": heads,
        "kv_heads": kv_dim, "head_dim": head_dim, "block": flash.block_size(k.size(key_seq), width),
    }
    return emit("attention", [q, k, v], NamedArray(value, q.dims), index, attrs, name, facts=_attention_facts(q, k, width, key_seq, head_dim))


# What the blockwise kernel holds while it runs, read from XLA:CPU's buffer assignments of its
# forward and backward alone (float32 and bfloat16; 1 to 16 key blocks; grouped and plain heads;
# ``tests/test_attention.py`` checks them): float32 ``[..., seq, block]`` tiles (the forward's
# scores and probabilities; the backward's probabilities, their gradient and the gradient of the
# scores), float32 copies of output-sized arrays, and, with more than one key block, the loop's
# carried and stacked copies.
ATTENTION_FORWARD_TILES = 2
ATTENTION_BACKWARD_TILES = 3


def attention_scratch(itemsize: int, head_dim: int, block: int, key_blocks: int, kv_share: float) -> tuple[float, float]:
    """``(forward, backward)`` bytes the blockwise kernel holds beyond its operands, result and
    (backward) their gradients, in multiples of its result's bytes. ``kv_share``: k's elements
    over q's.

    >>> attention_scratch(4, 8, 16, 1, 1.0)  # float32, one tile of 16 keys over head_dim 8
    (4.0, 6.0)
    """
    f32 = 4 / itemsize  # a float32 copy of the output, in outputs
    tile = f32 * block / head_dim  # one float32 [rows, block] tile
    forward = ATTENTION_FORWARD_TILES * tile
    backward = 4 * (f32 - 1) + ATTENTION_BACKWARD_TILES * tile  # + float32 copies (16-bit dtypes)
    if key_blocks > 1:  # the scan's carried accumulators, and copies of k's and v's tiles
        forward += (f32 - 1) + 3 * f32 * kv_share
        backward += (3 * f32 - 2) + 3 * f32 * kv_share
    return forward, backward


def _attention_facts(q: NamedArray, k: NamedArray, block: int, key_seq: str, head_dim: str) -> OpFacts:
    """What memory-efficient attention keeps and holds, in multiples of its output (q's shape):
    it keeps q, k, v, its output and the float32 log-sum-exp per row (``4 / itemsize / head_dim``
    of the output); its forward and backward hold what :func:`attention_scratch` gives, the
    backward also the gradients of q, k and v; never a ``[..., seq, key_seq]`` tensor."""
    from meshjax import flash

    keys = k.size(key_seq)
    width = flash.block_size(keys, block)
    forward, backward = attention_scratch(
        q.dtype.itemsize, q.size(head_dim), width, keys // width, _prod(k.shape) / _prod(q.shape)
    )
    return OpFacts.reading(
        3,
        also_saves_result=True,
        residuals=4 / q.dtype.itemsize / q.size(head_dim),
        forward_scratch=forward,
        # the backward's working set counts one result-sized temporary itself
        backward_scratch=backward - 1,
        holds_operand_gradients=True,
    )



# --- reshaping -------------------------------------------------------------------------------


def split_dim(x: NamedArray, dim: str, into: DimsLike, sizes: Mapping[str, int], *, name=None) -> NamedArray:
    """Split ``dim`` into several dims (row-major), e.g. ``hidden -> heads head_dim``.

    ``sizes`` gives every new dim's size but at most one, which is inferred.

    >>> x = named(jnp.ones((2, 12)), "batch hidden")
    >>> split_dim(x, "hidden", "heads head_dim", {"heads": 3}).sizes
    {'batch': 2, 'heads': 3, 'head_dim': 4}
    """
    new = parse_dims(into)
    total = x.size(dim)
    clash = set(new) & (set(x.dims) - {dim})
    if clash:
        raise ShapeError(f"split_dim: new dims {sorted(clash)} already exist on {format_dims(x.dims)!r}")
    known = {d: int(sizes[d]) for d in new if d in sizes}
    missing = [d for d in new if d not in known]
    if len(missing) > 1:
        raise ShapeError(f"split_dim {dim!r}: give the sizes of all of {format_dims(new)!r} but one")
    rest = _prod(known.values())
    if missing:
        if total % rest:
            raise ShapeError(f"split_dim: dim {dim!r} of size {total} is not divisible by {rest}")
        known[missing[0]] = total // rest
    if _prod(known.values()) != total:
        raise ShapeError(f"split_dim: {dim!r} has size {total}, the new dims {known} multiply to {_prod(known.values())}")
    axis = x.axis(dim)
    out_dims = (*x.dims[:axis], *new, *x.dims[axis + 1:])
    value = x.value.reshape(*x.shape[:axis], *(known[d] for d in new), *x.shape[axis + 1:])
    loop = tuple((d, s) for d, s in zip(out_dims, value.shape))
    operand = tuple(new[0] if d == dim else d for d in x.dims)  # the old dim walks the major new dim
    index = IndexForm(loop=loop, operands=(operand,), result=out_dims, whole=new[1:])
    return emit("split_dim", [x], NamedArray(value, out_dims), index, {"dim": dim, "into": new}, name, facts=LINEAR)


def merge_dims(x: NamedArray, dims: DimsLike, into: str, *, name=None) -> NamedArray:
    """Merge adjacent dims (row-major) into one, e.g. ``heads head_dim -> hidden``.

    >>> x = named(jnp.ones((2, 3, 4)), "batch heads head_dim")
    >>> merge_dims(x, "heads head_dim", "hidden").sizes
    {'batch': 2, 'hidden': 12}
    """
    group = parse_dims(dims)
    positions = [x.axis(d) for d in group]
    if positions != list(range(positions[0], positions[0] + len(group))):
        raise ShapeError(
            f"merge_dims: {format_dims(group)!r} must be adjacent and in order in {format_dims(x.dims)!r}"
        )
    if into in x.dims and into not in group:
        raise ShapeError(f"merge_dims: dim {into!r} already exists")
    start = positions[0]
    out_dims = (*x.dims[:start], into, *x.dims[start + len(group):])
    value = x.value.reshape(*x.shape[:start], -1, *x.shape[start + len(group):])
    result = (*x.dims[:start], group[0], *x.dims[start + len(group):])
    index = IndexForm(loop=tuple(x.sizes.items()), operands=(x.dims,), result=result, whole=group[1:])
    return emit("merge_dims", [x], NamedArray(value, out_dims), index, {"dims": group, "into": into}, name, facts=LINEAR)


def rename(x: NamedArray, mapping: Mapping[str, str], *, name=None) -> NamedArray:
    """Rename dims: ``rename(x, {"seq": "key_seq"})``."""
    for old in mapping:
        x.size(old)
    out_dims = tuple(mapping.get(d, d) for d in x.dims)
    parse_dims(out_dims, what="rename result")
    index = IndexForm(loop=tuple(x.sizes.items()), operands=(x.dims,), result=x.dims)
    return emit("rename", [x], NamedArray(x.value, out_dims), index, {"mapping": dict(mapping)}, name, facts=LINEAR)


def arange(dim: str, size: int, *, dtype=jnp.int32, name=None) -> NamedArray:
    """``0, 1, ..., size-1`` along ``dim`` (for masks and positions)."""
    value = jnp.arange(size, dtype=dtype)
    index = IndexForm(loop=((dim, size),), operands=(), result=(dim,))
    return emit("arange", [], NamedArray(value, (dim,)), index, {}, name, facts=LINEAR)


__all__ += ["named"]
