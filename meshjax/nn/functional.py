"""Tracing, planning and running Flax NNX modules with meshjax.

An NNX module is split (``nnx.split``) into its graph definition and its params; the params
become a nested dict of :class:`~meshjax.NamedArray` keyed like the NNX state
(``{"blocks": {0: {"attn": {"w_q": ...}}}}``), each with its param's logical dims, so the tensor
names of a trace are the state paths joined by ``/`` (``blocks/0/attn/w_q``), exactly what
:func:`meshjax.params.path_name` makes of them. The pure function ``fn(params, *inputs)``
merges the module back around the given values and calls it (or ``loss_fn(module, *inputs)``),
so :func:`meshjax.trace`, :meth:`meshjax.plan.Plan.program` and ``jax.jit`` all take it.

Example::

    >>> import meshjax as mj
    >>> from meshjax.devices import make_mesh
    >>> from meshjax.nn import Dense
    >>> from meshjax.solve import solve
    >>> layer = Dense("embed", "mlp", {"embed": 4, "mlp": 8}, rngs=nnx.Rngs(0))
    >>> x = mj.named(jnp.ones((8, 4)), "batch embed")
    >>> traced = trace_module(layer, x)
    >>> [(t.name, t.role) for t in traced.graph.tensors.values()]
    [('kernel', 'param'), ('x', 'input'), ('out', 'output')]
    >>> plan = solve(traced.graph, {"data": 4, "model": 2}, rules="batch:data;mlp:model")
    >>> y = plan.program(traced.fn, make_mesh({"data": 4, "model": 2})).jit()(traced.params, x)
    >>> y.dims, y.value.sharding.spec
    (('batch', 'mlp'), P('data', 'model'))
    >>> with nnx.logical_axis_rules(plan.logical_axis_rules()):
    ...     specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))   # = plan.param_specs
    >>> specs["kernel"].get_value()
    P(None, 'model')
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flax import nnx
from jax.sharding import PartitionSpec

from meshjax.graph import Graph
from meshjax.named import NamedArray
from meshjax.nn.layers import SHARDING_KEY, dims_of
from meshjax.trace import trace



def param_name(path: tuple) -> str:
    """An NNX state path as a tensor name: ``("blocks", 0, "attn", "w_q") -> "blocks/0/attn/w_q"``."""
    return "/".join(str(p) for p in path)


def _nest(items: list[tuple[tuple, Any]]) -> dict:
    out: dict = {}
    for path, value in items:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _flat(tree: Mapping, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def named_params(module_or_state: Any) -> dict:
    """The module's ``nnx.Param`` values (or a State's) as a nested dict of NamedArrays with their
    logical dims, keyed like the NNX state."""
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return _nest([(path, NamedArray(var.get_value(), dims_of(var))) for path, var in nnx.to_flat_state(state)])


def named_grads(grads: nnx.State) -> dict:
    """An ``nnx.grad`` result (a State of Params) as a nested dict of NamedArrays."""
    return named_params(grads)


def update_module(module: nnx.Module, params: Mapping) -> None:
    """Write a nested dict of NamedArrays (e.g. trained params) back into ``module``'s params."""
    state = nnx.state(module, nnx.Param)
    values = dict(_flat(params))
    new = []
    for path, var in nnx.to_flat_state(state):
        named = values[path]
        if tuple(named.dims) != dims_of(var):
            named = NamedArray(named.align_to(dims_of(var)), dims_of(var))
        new.append((path, var.replace(named.value)))
    nnx.update(module, nnx.from_flat_state(new))


def _input_names(call: Callable, skip_first: bool, n: int) -> list[str]:
    try:
        names = [
            p.name for p in inspect.signature(call).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        names = []
    names = names[1:] if skip_first else names
    names = names[:n]
    return [*names, *(f"arg{i}" for i in range(len(names), n))]


@dataclass
class Functional:
    """A module as a pure function of its params: ``fn(params, *inputs)``.

    ``params`` is the module's params as named arrays (the values at the time of the split);
    ``fn`` is what :func:`meshjax.trace` and :meth:`Plan.program` take; :meth:`merge` rebuilds
    the module around other values.
    """

    graphdef: Any
    template: nnx.State  # the split params: structure and metadata
    rest: Any  # every other variable of the module, passed through unchanged
    fn: Callable[..., Any]
    params: dict

    def merge(self, params: Mapping) -> nnx.Module:
        values = dict(_flat(params))
        new = []
        for path, var in nnx.to_flat_state(self.template):
            named = values[path]
            dims = dims_of(var)
            value = named.value if tuple(named.dims) == dims else named.align_to(dims)
            new.append((path, var.replace(value)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(new), self.rest)


def functional(module: nnx.Module, loss_fn: Callable[..., Any] | None = None, *, n_inputs: int | None = None) -> Functional:
    """``module`` as a pure function ``fn(params, *inputs) -> loss_fn(module, *inputs)`` (or
    ``module(*inputs)``). The inputs are named after ``loss_fn``'s parameters after the first
    (or ``module.__call__``'s), so a traced input is ``tokens``, not ``arg0``."""
    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    call = loss_fn if loss_fn is not None else type(module).__call__
    if n_inputs is None:
        try:
            n_inputs = sum(
                1 for p in list(inspect.signature(call).parameters.values())[1:]
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            )
        except (TypeError, ValueError):
            n_inputs = 0
    names = _input_names(call, True, n_inputs)
    box: list[Functional] = []

    def fn(params, *inputs):
        model = box[0].merge(params)
        return loss_fn(model, *inputs) if loss_fn is not None else model(*inputs)

    fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    fn.__name__ = getattr(loss_fn, "__name__", type(module).__name__)
    box.append(Functional(graphdef, state, rest, fn, named_params(state)))
    return box[0]


@dataclass
class TracedModule:
    """A traced NNX module: the graph, the pure function it was traced from and its params."""

    graph: Graph
    functional: Functional

    @property
    def fn(self) -> Callable[..., Any]:
        return self.functional.fn

    @property
    def params(self) -> dict:
        return self.functional.params

    def program(self, plan, mesh):
        """The plan's jit program of this module (``plan.program(self.fn, mesh)``)."""
        return plan.program(self.fn, mesh)


def trace_module(module: nnx.Module, *inputs: Any, loss_fn: Callable[..., Any] | None = None, find_repeats: bool = True) -> TracedModule:
    """Trace ``loss_fn(module, *inputs)`` (or ``module(*inputs)``) into a meshjax graph whose
    params are named by their NNX state paths (``blocks/0/attn/w_q``)."""
    f = functional(module, loss_fn, n_inputs=len(inputs))
    return TracedModule(trace(f.fn, f.params, *inputs, find_repeats=find_repeats), f)


@contextmanager
def plan_rules(plan) -> Iterator[list]:
    """``nnx.logical_axis_rules(plan.logical_axis_rules())``: Flax's sharding API then maps every
    param's logical dims to the plan's mesh axes. Needs a plan uniform per dim name."""
    rules = plan.logical_axis_rules()
    if rules is None:
        raise ValueError(
            "the plan splits some dim name differently in different tensors, so no logical axis rules "
            "describe it; solve with rules=... (or use plan.param_specs per tensor)"
        )
    with nnx.logical_axis_rules(rules):
        yield rules


def partition_specs(module: nnx.Module, plan=None) -> dict[str, PartitionSpec]:
    """Flax's own ``nnx.get_partition_spec`` of ``module``'s params, by tensor name, under the
    plan's logical axis rules (or the rules already active when ``plan`` is None)."""

    def read() -> dict[str, PartitionSpec]:
        specs = nnx.get_partition_spec(nnx.state(module, nnx.Param))
        return {param_name(path): var.get_value() for path, var in nnx.to_flat_state(specs)}

    if plan is None:
        return read()
    with plan_rules(plan):
        return read()


def normalize_spec(spec: PartitionSpec) -> PartitionSpec:
    """Drop trailing ``None`` entries (``P('data', None) -> P('data')``), the form plans use."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


__all__ = [
    "SHARDING_KEY", "Functional", "TracedModule", "functional", "named_grads", "named_params", "normalize_spec",
    "param_name", "partition_specs", "plan_rules", "trace_module", "update_module",
]
