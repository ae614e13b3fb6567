"""What named ops do as they run: record themselves (tracing) or pin their layout (lowering).

Named ops call :func:`emit` with their result. Outside any context it returns the result as is,
so meshjax ops also run eagerly. Inside :func:`trace <meshjax.trace.trace>` a :class:`Recorder`
adds a tensor and an op to the graph; inside a lowered program a :class:`Pinner` applies
``with_sharding_constraint`` with the tensor's planned layout. Both name tensors the same way
(scope path + op name, made unique), which is what ties a plan to the running program.

Example::

    >>> import meshjax as mj
    >>> def f(params, x):
    ...     with scope("mlp"):
    ...         return mj.einsum("batch embed, embed mlp -> batch mlp", x, params["w"], name="hidden")
    >>> sizes = {"batch": 2, "embed": 4, "mlp": 8}
    >>> graph = mj.trace(f, mj.abstract_params({"w": mj.param("embed mlp")}, sizes), mj.abstract("batch embed", sizes))
    >>> graph.outputs
    ('mlp/hidden',)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
import numpy as np

from meshjax.errors import TraceError
from meshjax.graph import Block, IndexForm, Op, OpFacts, Tensor
from meshjax.named import NamedArray

_CURRENT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar(
    "meshjax_context", default=None
)


class _Context:
    """Scope stack and unique naming shared by recording and pinning."""

    def __init__(self) -> None:
        self.scopes: list[str] = []
        self.used: dict[str, int] = defaultdict(int)
        self.blocks: list[str] = []

    @property
    def block(self) -> str | None:
        return self.blocks[-1] if self.blocks else None

    def reserve(self, names) -> None:
        """Keep op results from taking the names of inputs and params."""
        for name in names:
            self.used[name] = max(self.used[name], 1)

    def fresh_name(self, base: str) -> str:
        stem = "/".join([*self.scopes, base])
        count = self.used[stem]
        self.used[stem] += 1
        return stem if count == 0 else f"{stem}_{count}"

    def peek_name(self, base: str) -> str:
        """The name :meth:`fresh_name` will give next, without taking it."""
        stem = "/".join([*self.scopes, base])
        count = self.used[stem]
        return stem if count == 0 else f"{stem}_{count}"

    def operands(self, base: str, arrays: Sequence[NamedArray]) -> list[NamedArray]:
        """The operands an op about to run should compute with (lowering pins them)."""
        return list(arrays)

    def compute(self, base: str, arrays: Sequence[NamedArray], fn: Callable[[list[NamedArray]], Any]) -> tuple[list[NamedArray], Any]:
        """Run an op's ``fn`` on its operands: ``(operands, value)``."""
        operands = self.operands(base, arrays)
        return operands, fn(operands)

    def forget_names_under(self, prefix: str) -> None:
        """Let a re-traced scan body reuse its names (JAX may trace a body twice)."""
        for stem in [s for s in self.used if s == prefix or s.startswith(prefix + "/")]:
            del self.used[stem]

    def emit(self, kind, inputs, output, index, attrs, name, facts) -> tuple[NamedArray, str]:
        raise NotImplementedError

    def pin_as(self, array: NamedArray, name: str) -> NamedArray:
        """Give ``array`` the layout of tensor ``name`` (lowering only)."""
        return array

    def add_input(self, op_name: str, array: NamedArray) -> None:
        """Add ``array`` as a further input of an op already recorded (a loop's back edge)."""

    def leave_block(self) -> None:
        self.blocks.pop()

    def enter_block(self, block: Block) -> None:
        self.blocks.append(block.name)


class Recorder(_Context):
    """Builds the graph while a function runs on abstract values."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, Tensor] = {}
        self.ops: dict[str, Op] = {}
        self.block_info: dict[str, Block] = {}
        # (id(value), dims) -> (value kept alive, name). Dims are part of the key because
        # rename() returns the same value under new dims.
        self._names: dict[tuple[int, tuple[str, ...]], tuple[object, str]] = {}

    def register(self, array: NamedArray, name: str, role: str) -> Tensor:
        if name in self.tensors and role in ("input", "param"):
            raise TraceError(f"two inputs/params are both called {name!r}")
        tensor = Tensor(
            name=name,
            dims=array.dims,
            shape=tuple(int(s) for s in array.shape),
            dtype=np.dtype(array.dtype).name,
            role=role,
            block=self.block,
        )
        self.tensors[name] = tensor
        self._names[(id(array.value), array.dims)] = (array.value, name)
        return tensor

    def name_of(self, array: NamedArray) -> str:
        """The tensor name of ``array``; a value no op produced becomes a constant tensor."""
        entry = self._names.get((id(array.value), array.dims))
        if entry is not None:
            return entry[1]
        return self.register(array, self.fresh_name("constant"), "constant").name

    def emit(self, kind, inputs, output, index, attrs, name, facts) -> NamedArray:
        if not isinstance(facts, OpFacts):
            raise TraceError(
                f"op {name or kind!r} (kind {kind!r}) was emitted without its OpFacts: the cost model "
                "needs to know what its backward pass reads; pass facts= to emit"
            )
        input_names = tuple(self.name_of(a) for a in inputs)
        if (id(output.value), output.dims) in self._names:
            # An op that hands back its input's value (a no-op cast) still gets its own tensor.
            output = NamedArray.tree_unflatten(output.dims, (jnp.array(output.value, copy=True),))
        if name:
            taken = self.tensors.get("/".join([*self.scopes, name]))
            if taken is not None and taken.role in ("param", "input"):
                raise TraceError(
                    f"{kind} op named {name!r} would share its name with the {taken.role} {taken.name!r}; "
                    f"give the op another name"
                )
        out_name = self.fresh_name(name or kind)
        self.register(output, out_name, "activation")
        self.ops[out_name] = Op(
            name=out_name,
            kind=kind,
            inputs=input_names,
            output=out_name,
            index=index,
            attrs=dict(attrs),
            block=self.block,
            facts=facts,
        )
        return output, out_name

    def enter_block(self, block: Block) -> None:
        super().enter_block(block)
        self.block_info[block.name] = block

    def add_input(self, op_name: str, array: NamedArray) -> None:
        op = self.ops[op_name]
        if op.index.operands and len(op.inputs) > 1:
            return  # already added when JAX traced this body before
        index = op.index
        index = IndexForm(
            loop=index.loop,
            operands=(*index.operands, array.dims),
            result=index.result,
            flops=index.flops,
        )
        self.ops[op_name] = Op(op.name, op.kind, (*op.inputs, self.name_of(array)), op.output, index, op.attrs, op.block, op.facts)


class Pinner(_Context):
    """Applies the planned layout of every tensor as it is computed (``name -> PartitionSpec``)."""

    def __init__(
        self,
        mesh: jax.sharding.Mesh,
        specs: dict[str, jax.sharding.PartitionSpec],
        operand_specs: dict[str, tuple[jax.sharding.PartitionSpec | None, ...]] | None = None,
        recomputed: dict[str, tuple[bool, ...]] | None = None,
        computed_specs: dict[str, jax.sharding.PartitionSpec] | None = None,
        remat: dict[str, tuple[str, ...]] | None = None,
    ):
        super().__init__()
        self.mesh = mesh
        self.specs = specs
        self.operand_specs = operand_specs or {}
        self.recomputed = recomputed or {}
        self.computed_specs = computed_specs or {}
        # Scope prefix of a rematerialised block -> the tensor names its checkpoint saves.
        self.remat = remat or {}

    def compute(self, base: str, arrays: Sequence[NamedArray], fn: Callable[[list[NamedArray]], Any]) -> tuple[list[NamedArray], Any]:
        op_name = self.peek_name(base)
        # The scope puts the op's name into the HLO metadata of everything it lowers to,
        # collectives included, so verify can set them beside the op's predicted ones.
        with jax.named_scope(op_name):
            return self._compute(op_name, base, arrays, fn)

    def _compute(self, op_name: str, base: str, arrays: Sequence[NamedArray], fn: Callable[[list[NamedArray]], Any]) -> tuple[list[NamedArray], Any]:
        if not any(self.recomputed.get(op_name, ())):
            return super().compute(base, arrays, fn)
        # The op's backward reads an operand it reshards: keep the operands as they came and
        # redo the reshards in the backward pass (FSDP's second all-gather) instead of keeping
        # the resharded copies until then.
        specs = self.operand_specs[op_name]
        dims = [a.dims for a in arrays]

        def forward(*values):
            pinned = [
                v if spec is None else jax.lax.with_sharding_constraint(v, jax.sharding.NamedSharding(self.mesh, spec))
                for v, spec in zip(values, specs)
            ]
            return fn([NamedArray.tree_unflatten(d, (v,)) for d, v in zip(dims, pinned)])

        @jax.custom_vjp
        def run(*values):
            return forward(*values)

        def run_fwd(*values):
            return forward(*values), values

        def run_bwd(values, cotangent):
            # The barrier keeps XLA from merging the backward's reshards with the forward's
            # (which would keep the resharded copies alive again).
            values = jax.lax.optimization_barrier(values)
            return jax.vjp(forward, *values)[1](cotangent)

        run.defvjp(run_fwd, run_bwd)
        return list(arrays), run(*(a.value for a in arrays))

    def operands(self, base: str, arrays: Sequence[NamedArray]) -> list[NamedArray]:
        # Pinning each operand where the op's planned strategy wants it fixes both directions:
        # the forward reshard into the op, and (transposed) the layout XLA must produce its
        # gradient in, so the backward pass runs the planned strategy too.
        specs = self.operand_specs.get(self.peek_name(base))
        if not specs:
            return list(arrays)
        out = []
        for array, spec in zip(arrays, specs):
            if spec is not None:
                sharding = jax.sharding.NamedSharding(self.mesh, spec)
                array = NamedArray.tree_unflatten(array.dims, (jax.lax.with_sharding_constraint(array.value, sharding),))
            out.append(array)
        return out

    def pin(self, array: NamedArray, name: str) -> NamedArray:
        computed = self.computed_specs.get(name)
        if computed is not None:  # computed sharded, then gathered (the planned strategy)
            sharding = jax.sharding.NamedSharding(self.mesh, computed)
            array = NamedArray.tree_unflatten(array.dims, (jax.lax.with_sharding_constraint(array.value, sharding),))
        spec = self.specs.get(name)
        if spec is None:
            return array
        sharding = jax.sharding.NamedSharding(self.mesh, spec)
        return NamedArray.tree_unflatten(
            array.dims, (jax.lax.with_sharding_constraint(array.value, sharding),)
        )

    def emit(self, kind, inputs, output, index, attrs, name, facts) -> tuple[NamedArray, str]:
        out_name = self.fresh_name(name or kind)
        with jax.named_scope(out_name):
            pinned = self.pin(output, out_name)
            if self.remat:  # names a checkpoint policy can save (an identity otherwise)
                value = checkpoint_name(pinned.value, out_name)
                pinned = NamedArray.tree_unflatten(pinned.dims, (value,))
            return pinned, out_name

    def remat_policy(self, prefix: str) -> Any:
        """The ``jax.checkpoint`` policy of the block whose tensors are named ``prefix...``, or
        None when the block keeps everything."""
        names = self.remat.get(prefix)
        if names is None:
            return None
        return jax.checkpoint_policies.save_only_these_names(*names)

    def pin_as(self, array: NamedArray, name: str) -> NamedArray:
        return self.pin(array, name)


def current() -> _Context | None:
    return _CURRENT.get()


@contextlib.contextmanager
def active(ctx: _Context) -> Iterator[_Context]:
    """Make ``ctx`` the context named ops report to."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix the names of tensors made inside with ``name/``.

    Scopes nest: ``scope("block")`` around ``scope("mlp")`` names an op ``hidden`` made inside
    ``block/mlp/hidden``. Outside a trace or a lowered program a scope does nothing.
    """
    if "/" in name or not name:
        raise TraceError(f"scope name {name!r} must be non-empty and contain no '/'")
    ctx = current()
    if ctx is None:
        yield
        return
    ctx.scopes.append(name)
    try:
        yield
    finally:
        ctx.scopes.pop()


def compute(
    kind: str, name: str | None, arrays: Sequence[NamedArray], fn: Callable[[list[NamedArray]], Any]
) -> tuple[list[NamedArray], Any]:
    """How an op computes: ``fn(operands) -> value`` on its operands as the active context wants
    them (pinned when lowering). Returns ``(operands, value)``; pass the operands to :func:`emit`.

    >>> from meshjax.named import named
    >>> x = named(jnp.zeros(3), "embed")
    >>> operands, value = compute("exp", None, [x], lambda ops: jnp.exp(ops[0].value))
    >>> value.tolist()                 # outside any context: computed as is
    [1.0, 1.0, 1.0]
    """
    ctx = current()
    if ctx is None:
        return list(arrays), fn(list(arrays))
    return ctx.compute(name or kind, arrays, fn)


def emit(
    kind: str,
    inputs: Sequence[NamedArray],
    output: NamedArray,
    index: IndexForm,
    attrs: dict | None = None,
    name: str | None = None,
    *,
    facts: OpFacts | None = None,
) -> NamedArray:
    """Report a finished op to the active context; returns the (possibly pinned) result.

    ``facts`` declares what the cost model needs beyond ``index`` (what the op's backward pass
    reads, whether it is a reduction); tracing an op without them is an error.
    """
    ctx = current()
    if ctx is None:
        return output
    return ctx.emit(kind, inputs, output, index, attrs or {}, name, facts)[0]
