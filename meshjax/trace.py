"""Trace a function over named arrays into a :class:`~meshjax.graph.Graph`, on abstract values.

Tensor names: params by their pytree path (``block/mlp/w_in``), inputs by the function's
argument names (``x``, ``batch/tokens``), activations by scope and op (``block/mlp/hidden``).

Example::

    >>> import meshjax as mj
    >>> def loss(params, x):
    ...     h = mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w_in"], name="h")
    ...     return mj.mean(mj.square(h), "batch mlp")
    >>> sizes = {"batch": 8, "embed": 16, "mlp": 64}
    >>> params = mj.abstract_params({"w_in": mj.param("embed mlp")}, sizes)
    >>> graph = trace(loss, params, mj.abstract("batch embed", sizes))
    >>> [(t.name, t.role) for t in graph.tensors.values()]
    [('w_in', 'param'), ('x', 'input'), ('h', 'activation'), ('square', 'activation'), ('mean', 'output')]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax

from meshjax import context
from meshjax.errors import TraceError
from meshjax.graph import Graph, find_unrolled_blocks
from meshjax.named import NamedArray, is_named
from meshjax.params import path_name



@dataclass(frozen=True)
class Signature:
    """How a function's arguments map to tensor names: the flat leaves of ``(params, *args)``."""

    names: tuple[str, ...]  # one per leaf, in flattening order
    roles: tuple[str, ...]
    dims: tuple[tuple[str, ...], ...]
    treedef: Any

    def flatten(self, params: Any, *args: Any) -> list[NamedArray]:
        leaves, treedef = jax.tree_util.tree_flatten((params, args), is_leaf=is_named)
        if treedef != self.treedef:
            raise TraceError(f"arguments do not have the structure the plan was made for:\n{treedef}\nvs\n{self.treedef}")
        return leaves


def arg_names(fn: Callable, n_args: int) -> list[str]:
    """Names for the positional arguments after ``params``: the function's own parameter names."""
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][1:]
    except (TypeError, ValueError):
        params = []
    if len(params) >= n_args:
        return params[:n_args]
    return [*params, *(f"arg{i}" for i in range(len(params), n_args))]


def signature_of(fn: Callable, params: Any, *args: Any) -> Signature:
    """Name every NamedArray leaf of ``params`` and ``args``; other leaves are an error."""
    names, roles, dims = [], [], []
    labels = arg_names(fn, len(args))
    for group, tree, role in [(None, params, "param"), *((labels[i], a, "input") for i, a in enumerate(args))]:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_named)[0]:
            name = "/".join(p for p in (group, path_name(path)) if p)
            if not is_named(leaf):
                raise TraceError(
                    f"{role} {name or '(root)'!r} is a {type(leaf).__name__}, not a NamedArray: "
                    "wrap arrays with meshjax.named(value, 'dims')"
                )
            names.append(name or role)
            roles.append(role)
            dims.append(leaf.dims)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise TraceError(f"two leaves would both be called {dupes}")
    treedef = jax.tree_util.tree_structure((params, args), is_leaf=is_named)
    return Signature(tuple(names), tuple(roles), tuple(dims), treedef)


def trace(fn: Callable, params: Any, *args: Any, find_repeats: bool = True) -> Graph:
    """Run ``fn(params, *args)`` on abstract values and record its graph.

    ``params`` and ``args`` are pytrees of :class:`NamedArray` whose values may be concrete
    arrays or ``jax.ShapeDtypeStruct`` (so paper-size models cost no memory). The outputs are
    the NamedArray leaves ``fn`` returns.
    """
    sig = signature_of(fn, params, *args)
    leaves = sig.flatten(params, *args)
    recorder = context.Recorder()
    out_names: list[str] = []
    out_tree: list[Any] = [None]

    def run(values: Sequence[Any]):
        named_leaves = [NamedArray.tree_unflatten(leaf.dims, (v,)) for leaf, v in zip(leaves, values)]
        recorder.reserve(sig.names)
        for array, name, role in zip(named_leaves, sig.names, sig.roles):
            recorder.register(array, name, role)
        p, a = jax.tree_util.tree_unflatten(sig.treedef, named_leaves)
        with context.active(recorder):
            out = fn(p, *a)
        out_leaves, out_tree[0] = jax.tree_util.tree_flatten(out, is_leaf=is_named)
        for leaf in out_leaves:
            if not is_named(leaf):
                raise TraceError(f"{getattr(fn, '__name__', 'fn')} must return NamedArrays, got {type(leaf).__name__}")
            out_names.append(recorder.name_of(leaf))
        return [leaf.value for leaf in out_leaves]

    abstract = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
    jax.eval_shape(run, abstract)
    tensors = dict(recorder.tensors)
    for name in out_names:
        if tensors[name].role == "activation":
            tensors[name] = replace(tensors[name], role="output")
    graph = Graph(
        tensors=tensors,
        ops=list(recorder.ops.values()),
        blocks=dict(recorder.block_info),
        outputs=tuple(out_names),
        signature=sig,
        out_tree=out_tree[0],
    )
    if find_repeats:
        graph.blocks.update(find_unrolled_blocks(graph))
    return graph
