"""Lowering: a function plus a layout for every tensor becomes one ``jax.jit`` program.

Inputs and params enter with their planned ``NamedSharding``; every intermediate tensor is
pinned with ``with_sharding_constraint`` as it is computed (the :class:`~meshjax.context.Pinner`
finds it by the name the trace gave it); outputs leave with their planned sharding. Under
``jax.grad`` the constraints transpose onto the cotangents, so the backward pass follows the same
layouts, and gradients leave with their parameter's sharding.

An op whose backward pass reads an operand it resharded (a weight an FSDP plan gathers for a
matmul) keeps the operand as it came and reshards it again in the backward pass, rather than
keeping the gathered copy alive in between (the Pinner wraps the op in a ``jax.custom_vjp``).
Memory stays what the plan predicts; the cost model charges the second gather.

:class:`Program` shows an example, and the plain ``jax.jit`` program it amounts to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshjax import context
from meshjax.cost.memory import keeps_operand
from meshjax.cost.remat import saved_names
from meshjax.devices import auto_axes, mesh_shape
from meshjax import validate as checks
from meshjax.errors import TraceError
from meshjax.graph import Graph
from meshjax.layout import Layout, validate
from meshjax.named import NamedArray, is_named


def named_sharding(mesh: Mesh, spec: PartitionSpec | None) -> NamedSharding:
    """The ``NamedSharding`` of ``spec`` on ``mesh`` (``None``: replicated)."""
    return NamedSharding(mesh, spec if spec is not None else PartitionSpec())


def _slices_in_place(piece: Layout, stacked: Layout) -> bool:
    """Whether slicing ``stacked`` along its one dim ``piece`` lacks (kept whole) gives ``piece``'s
    layout."""
    scanned = [d for d in stacked.dims if d not in piece.dims]
    return len(scanned) == 1 and not stacked.of(scanned[0]) and all(piece.of(d) == stacked.of(d) for d in piece.dims)


def sharding_tree(signature: Any, mesh: Mesh, specs: Mapping[str, PartitionSpec]) -> Any:
    """``(params, args)`` shaped like the traced arguments of ``signature``, with the
    ``NamedSharding`` of each leaf's spec in ``specs`` (by tensor name) in place of its array."""
    leaves = [
        NamedArray.tree_unflatten(dims, (named_sharding(mesh, specs.get(name)),))
        for name, dims in zip(signature.names, signature.dims)
    ]
    return jax.tree_util.tree_unflatten(signature.treedef, leaves)


class Program:
    """``fn`` (as traced into ``graph``) laid out on ``mesh`` by ``layouts`` (name -> Layout).

    >>> from meshjax import models
    >>> from meshjax.devices import make_mesh
    >>> from meshjax.layout import layout_from_rules
    >>> ex = models.example("mlp-tiny")
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> mesh = make_mesh({"data": 4, "model": 2})
    >>> program = Program(ex.loss, graph, mesh, layout_from_rules(graph, mesh.shape, "batch:data;mlp:model"))
    >>> loss = program.jit()(ex.params, *ex.batch)
    >>> loss, grads = program.jit(grad=True)(ex.params, *ex.batch)
    >>> grads["mlp"]["w_in"].value.sharding.spec
    P(None, 'model')

    It is the program one would write by hand with ``jax.jit`` and
    ``jax.lax.with_sharding_constraint``, every tensor pinned to its planned spec (here the MLP
    of :mod:`meshjax.models.mlp`):

    >>> from jax.sharding import NamedSharding
    >>> def pin(value, tensor):
    ...     return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, program.layouts[tensor].spec()))
    >>> @jax.jit
    ... def by_hand(w_in, w_out, x, target):
    ...     h = pin(jax.nn.gelu(pin(jnp.einsum("be,em->bm", x, w_in), "mlp/hidden")), "mlp/act")
    ...     y = pin(x + pin(jnp.einsum("bm,me->be", h, w_out), "mlp/out"), "mlp/residual")
    ...     return jnp.mean(jnp.square(y - target))
    >>> w = ex.params["mlp"]
    >>> by_hand(w["w_in"].value, w["w_out"].value, *(b.value for b in ex.batch))  # doctest: +ELLIPSIS
    Array(..., dtype=float32)
    >>> bool(jnp.allclose(_, loss.value))
    True
    """

    def __init__(
        self,
        fn: Callable,
        graph: Graph,
        mesh: Mesh,
        layouts: Mapping[str, Layout],
        operand_layouts: Mapping[str, tuple[Layout, ...]] | None = None,
        computed_layouts: Mapping[str, Layout] | None = None,
        remat: Mapping[str, str] | None = None,
    ):
        if graph.signature is None:
            raise TraceError("the graph has no signature: make it with meshjax.trace")
        self.fn = fn
        self.graph = graph
        self.mesh = auto_axes(mesh)
        self.layouts = dict(layouts)
        # op name -> the layout each operand is computed in (a solved plan's strategies); ops
        # without an entry compute wherever XLA's propagation puts them.
        self.operand_specs = {
            op: tuple(layout.spec() for layout in operand) for op, operand in (operand_layouts or {}).items()
        }
        # op name -> the layout the op computes its result in before gathering it into its
        # planned layout (pinned first, so XLA gathers the result, not the operands).
        self.computed_specs = {op: layout.spec() for op, layout in (computed_layouts or {}).items()}
        # op name -> per operand, whether the backward pass re-does its reshard (see module doc).
        ops = {op.name: op for op in graph.ops}
        self.recomputed = {
            name: tuple(
                keeps_operand(ops[name], i) and layout.axes != self.layouts[src].axes
                for i, (src, layout) in enumerate(zip(ops[name].inputs, operand))
            )
            for name, operand in (operand_layouts or {}).items()
            if name in ops
        }
        # A scan's slice of a stacked param or input, used in the layout it comes in, is left
        # unpinned: JAX's scan then reads the backward pass's copy back from the stacked array;
        # a pinned slice is a new value, which the loop stacks as a second copy of every layer's
        # weights (what the cost model does not count: meshjax.cost.memory.saved_for_backward).
        self.free_slices = frozenset(
            name for name, src in graph.sliced_from.items()
            if name in self.layouts and src in self.layouts and _slices_in_place(self.layouts[name], self.layouts[src])
        )
        for op in graph.ops:
            specs = self.operand_specs.get(op.name)
            if specs is not None and any(i in self.free_slices for i in op.inputs):
                self.operand_specs[op.name] = tuple(
                    None if i in self.free_slices and spec == self.spec(i) else spec for i, spec in zip(op.inputs, specs)
                )
        # Scope prefix of each rematerialised block (instance) -> the names its checkpoint saves.
        self.remat = {}
        for unit, policy in (remat or {}).items():
            if policy == "none":
                continue
            block = graph.blocks[unit]
            prefixes = block.instances if block.kind == "unrolled" else (unit + "/",)
            for prefix in prefixes:
                self.remat[prefix] = saved_names(graph, unit, policy, prefix)
        shape = mesh_shape(self.mesh)
        for name, layout in self.layouts.items():
            validate(graph.tensor(name), layout, shape)
        sig = graph.signature
        self._param_idx = [i for i, r in enumerate(sig.roles) if r == "param"]
        self._input_idx = [i for i, r in enumerate(sig.roles) if r == "input"]
        self._cache: dict[tuple[bool, bool], Callable] = {}

    # --- shardings ---------------------------------------------------------------------------
    def spec(self, name: str) -> PartitionSpec:
        layout = self.layouts.get(name)
        return layout.spec() if layout is not None else PartitionSpec()

    def sharding(self, name: str) -> NamedSharding:
        return named_sharding(self.mesh, self.spec(name))

    @property
    def specs(self) -> dict[str, PartitionSpec]:
        return {name: layout.spec() for name, layout in self.layouts.items()}

    def _shardings(self, idx: list[int]) -> list[NamedSharding]:
        return [self.sharding(self.graph.signature.names[i]) for i in idx]

    def place(self, params: Any, *args: Any) -> tuple[Any, tuple]:
        """``device_put`` params and inputs with their planned shardings."""
        sig = self.graph.signature
        leaves = sig.flatten(params, *args)
        checks.arrays_match(self.graph, sig.names, leaves)
        placed = [
            NamedArray.tree_unflatten(leaf.dims, (jax.device_put(leaf.value, self.sharding(name)),))
            for leaf, name in zip(leaves, sig.names)
        ]
        return jax.tree_util.tree_unflatten(sig.treedef, placed)

    # --- the jitted program ------------------------------------------------------------------
    def jit(self, *, grad: bool = False, donate_params: bool = False) -> Jitted:
        """The program ``f(params, *args) -> outputs``; with ``grad=True``, for a function that
        returns one scalar loss, ``f(params, *args) -> (loss, grads)``."""
        key = (grad, donate_params)
        if key not in self._cache:
            self._cache[key] = Jitted(self, grad, donate_params)
        return self._cache[key]

    def lower(self, params: Any, *args: Any, grad: bool = False) -> jax.stages.Lowered:
        return self.jit(grad=grad).lower(params, *args)

    def compile(self, params: Any, *args: Any, grad: bool = False) -> jax.stages.Compiled:
        """Compile for concrete or abstract (``ShapeDtypeStruct``) arguments."""
        return self.lower(params, *args, grad=grad).compile()

    def pinned_fn(self) -> Callable:
        """``fn(params, *args)`` with every tensor pinned to its planned layout, for use while
        JAX traces (inside ``jax.jit`` / ``jax.grad``)."""
        sig = self.graph.signature

        def pinned(params: Any, *args: Any) -> Any:
            specs = {name: spec for name, spec in self.specs.items() if name not in self.free_slices}
            pinner = context.Pinner(self.mesh, specs, self.operand_specs, self.recomputed, self.computed_specs, self.remat)
            pinner.reserve(sig.names)
            with context.active(pinner):
                return self.fn(params, *args)

        return pinned

    def _run(self, param_values: list, arg_values: list) -> list[NamedArray]:
        """:meth:`pinned_fn` on flat values; returns the output leaves."""
        sig = self.graph.signature
        values: list[Any] = [None] * len(sig.names)
        for i, v in zip(self._param_idx, param_values):
            values[i] = v
        for i, v in zip(self._input_idx, arg_values):
            values[i] = v
        leaves = [NamedArray.tree_unflatten(d, (v,)) for d, v in zip(sig.dims, values)]
        params, args = jax.tree_util.tree_unflatten(sig.treedef, leaves)
        out = self.pinned_fn()(params, *args)
        return jax.tree_util.tree_leaves(out, is_leaf=is_named)


class Jitted:
    """A laid-out program: call it like the user's function, or ``.lower(...)`` it."""

    def __init__(self, program: Program, grad: bool, donate_params: bool):
        self.program = program
        self.grad = grad
        p = program
        param_sh = p._shardings(p._param_idx)
        arg_sh = p._shardings(p._input_idx)
        out_sh = [p.sharding(n) for n in p.graph.outputs]
        if grad:
            if len(p.graph.outputs) != 1 or p.graph.tensors[p.graph.outputs[0]].dims != ():
                raise TraceError("grad=True needs a function that returns one scalar NamedArray (a loss)")

            def loss(param_values, arg_values):
                return p._run(param_values, arg_values)[0].value

            body = jax.value_and_grad(loss)
            out_shardings: Any = (out_sh[0], param_sh)
        else:

            def body(param_values, arg_values):
                return [leaf.value for leaf in p._run(param_values, arg_values)]

            out_shardings = out_sh
        self._jitted = jax.jit(
            body,
            in_shardings=(param_sh, arg_sh),
            out_shardings=out_shardings,
            donate_argnums=(0,) if donate_params else (),
        )

    def arguments(self, params: Any, args: tuple, abstract: bool = False) -> tuple[list, list]:
        """The flat ``(param values, input values)`` the jitted function takes (as
        ``ShapeDtypeStruct`` when ``abstract``): call a compiled program with them."""
        p = self.program
        leaves = p.graph.signature.flatten(params, *args)
        checks.arrays_match(p.graph, p.graph.signature.names, leaves)
        values = [
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if abstract else leaf.value for leaf in leaves
        ]
        return [values[i] for i in p._param_idx], [values[i] for i in p._input_idx]

    def __call__(self, params: Any, *args: Any):
        graph = self.program.graph
        result = self._jitted(*self.arguments(params, args))
        if not self.grad:
            out_dims = [graph.tensors[n].dims for n in graph.outputs]
            leaves = [NamedArray.tree_unflatten(d, (v,)) for d, v in zip(out_dims, result)]
            return jax.tree_util.tree_unflatten(graph.out_tree, leaves)
        loss, grads = result
        param_leaves, param_def = jax.tree_util.tree_flatten(params, is_leaf=is_named)
        grad_leaves = [NamedArray.tree_unflatten(leaf.dims, (g,)) for leaf, g in zip(param_leaves, grads)]
        return NamedArray.tree_unflatten((), (loss,)), jax.tree_util.tree_unflatten(param_def, grad_leaves)

    def lower(self, params: Any, *args: Any) -> jax.stages.Lowered:
        return self._jitted.lower(*self.arguments(params, args, abstract=True))
