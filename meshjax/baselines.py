"""Hand-written sharding strategies, as layout assignments for a traced graph, and a way to price
any assignment with the solver's cost model.

Each strategy is a function ``(graph, mesh_shape) -> Baseline``: a layout for the tensors it
decides (``layouts``, name -> :class:`~meshjax.layout.Layout`) and ``notes`` saying where it had
to deviate (a dim that no mesh axis divides stays replicated; a rule for an axis the mesh does
not have is dropped).

Dim roles. Strategies speak of dims by role: ``batch``, the model-parallel dims ``mlp``,
``heads``, ``vocab`` and ``experts``, ``embed`` and ``seq``. Each role names the zoo's dim of the same
name unless ``roles`` maps it to a dim of the user's model (``{"batch": "img", "mlp": "ffn"}``;
``meshjax compare --roles batch=img,mlp=ffn``). A strategy whose roles name no dim of the model
(``batch`` for all of them; at least one model-parallel role for ``megatron``,
``megatron-sp``, ``mtf``, ``gspmd`` and ``xla-prop``; ``seq`` and ``embed`` for
``megatron-sp``), or a mapping to a dim the model lacks, is an error naming the role
and the model's dims, never a silent "replicate everything".

Axis roles. ``dp`` and ``fsdp`` use every mesh axis as a data axis (8 devices of data
parallelism whatever the mesh is called). ``megatron``, ``megatron-sp`` and ``xla-prop`` use the axis named
``model`` (on a 1D mesh: its only axis) for tensor parallelism and every other axis for data.
``mtf`` and ``gspmd`` are named rules: they use the axes called ``data`` and ``model`` and drop
rules for an axis the mesh lacks.

===============  ==========================================================================
``dp``           batch split over all axes, params replicated
``fsdp``         ZeRO-3: batch over all axes, each param split on its largest dim divisible
                 by the data axes (gathered by XLA before use)
``megatron``     Megatron-LM tensor parallel: mlp, heads and vocab on ``model`` (column then
                 row parallel), batch on the other axes, the residual stream replicated
``megatron-sp``  Megatron with sequence parallelism (Korthikanti et al. 2022): as ``megatron``,
                 and every activation with no model-parallel dim that carries ``embed``
                 and ``seq`` (layernorm, residual, embedding output) split on ``seq``
                 over ``model``: each all-reduce becomes an all-gather before the column
                 parallel matmul and a reduce-scatter after the row parallel one
``mtf``          Mesh-TensorFlow rules ``batch:data;mlp:model;heads:model;vocab:model``
``gspmd``        GSPMD's 2D layout: weights split on both axes (embed on ``data``;
                 mlp/heads/vocab on ``model``), activations batch on ``data`` and
                 mlp/heads/vocab on ``model``
``xla-prop``     what a typical user writes: inputs batch on the data axes and params
                 Megatron-style; activations are left for XLA's sharding propagation
===============  ==========================================================================

Example::

    >>> parse_roles("batch=img,mlp=ffn")
    {'batch': 'img', 'mlp': 'ffn'}
    >>> from meshjax import models
    >>> ex = models.example("mlp-tiny", abstract=True, batch=8192, embed=1024, mlp=4096)
    >>> graph = mj.trace(ex.loss, ex.params, *ex.batch)
    >>> base = BASELINES["fsdp"](graph, {"data": 4, "model": 2})
    >>> str(base.layouts["mlp/w_in"])             # the largest dim split over every axis
    '[embed, mlp:data+model]'
    >>> plan, notes = predict(graph, {"data": 4, "model": 2}, base.layouts, "h100-node", train=True)
    >>> notes, plan.step_time_s > 0
    ([], True)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from meshjax.cost.hardware import Hardware, get_hardware
from meshjax.errors import InfeasibleError, MeshjaxError
from meshjax.graph import Graph, Tensor
from meshjax.layout import Layout, MeshShape
from meshjax.optimizer import Optimizer
from meshjax.solver.ilp import solve_ilp
from meshjax.solver.problem import Problem, build_problem
from meshjax.solver.reduce import restrict

Wanted = Mapping[str, tuple[str, ...]]  # dim -> mesh axes a strategy wants for it


@dataclass
class Baseline:
    """A hand-written strategy's layouts on one mesh. ``partial``: only some tensors are
    pinned (the rest are left to XLA's propagation when compiled, to the solver when priced)."""

    name: str
    layouts: dict[str, Layout]
    notes: list[str] = field(default_factory=list)
    partial: bool = False


# --- building layouts ------------------------------------------------------------------------


def _assign(
    graph: Graph,
    mesh_shape: MeshShape,
    want: Callable[[Tensor], Wanted | None],
    notes: list[str],
) -> dict[str, Layout]:
    """A layout per tensor for which ``want`` gives ``{dim: axes}``: axes the mesh lacks are
    dropped, an axis already used by an earlier dim of the tensor is dropped, and a dim whose
    size the axes do not divide stays replicated (each such fallback is noted once per dim)."""
    out: dict[str, Layout] = {}
    seen_notes: set[str] = set()

    def note(text: str) -> None:
        if text not in seen_notes:
            seen_notes.add(text)
            notes.append(text)

    for name, tensor in graph.tensors.items():
        wanted = want(tensor)
        if wanted is None:
            continue
        used: set[str] = set()
        axes_per_dim = []
        for dim, size in zip(tensor.dims, tensor.shape):
            axes = tuple(a for a in wanted.get(dim, ()) if a in mesh_shape and mesh_shape[a] > 1 and a not in used)
            factor = math.prod(mesh_shape[a] for a in axes)
            if axes and size % factor:
                note(f"{dim} ({size}) is not divisible by {'+'.join(axes)} ({factor}): replicated")
                axes = ()
            used.update(axes)
            axes_per_dim.append(axes)
        out[name] = Layout(tensor.dims, tuple(axes_per_dim))
    return out


ROLES = ("batch", "mlp", "heads", "vocab", "experts", "embed", "seq")
"""The dim roles strategies use; by default each names the zoo's dim of the same name."""
MODEL_PARALLEL_ROLES = ("mlp", "heads", "vocab", "experts")
Roles = Mapping[str, str]  # role -> dim of the model


def parse_roles(text: str | None) -> dict[str, str]:
    """``"batch=img,mlp=ffn"`` -> ``{"batch": "img", "mlp": "ffn"}``; an unknown role is an error."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        role, sep, dim = (x.strip() for x in item.partition("="))
        if not sep or not role or not dim:
            raise MeshjaxError(f"--roles {text!r}: {item.strip()!r} is not of the form role=dim")
        if role not in ROLES:
            raise MeshjaxError(f"--roles: unknown role {role!r}; roles: {', '.join(ROLES)}")
        out[role] = dim
    return out


def resolve_roles(graph: Graph, strategy: str, roles: Roles | None, *, model_parallel: bool) -> dict[str, str]:
    """Role -> dim of ``graph`` for ``strategy``: the roles the model has a dim for (zoo names
    unless ``roles`` maps them). Raises when a mapped dim is missing, when ``batch`` names no
    dim, or (``model_parallel``) when no model-parallel role does."""
    given = dict(roles or {})
    for role in given:
        if role not in ROLES:
            raise MeshjaxError(f"unknown dim role {role!r}; roles: {', '.join(ROLES)}")
    dims = graph.dim_names
    listed = ", ".join(sorted(dims))
    for role, dim in given.items():
        if dim not in dims:
            raise MeshjaxError(f"role {role}={dim}: the model has no dim {dim!r} (its dims: {listed})")
    mapping = {role: given.get(role, role) for role in ROLES}
    if mapping["batch"] not in dims:
        raise MeshjaxError(
            f"baseline {strategy}: no dim plays the batch role (no dim {mapping['batch']!r}; the model's dims: "
            f"{listed}); map it, e.g. --roles batch=DIM"
        )
    present = {role: dim for role, dim in mapping.items() if dim in dims}
    if model_parallel and not any(r in present for r in MODEL_PARALLEL_ROLES):
        raise MeshjaxError(
            f"baseline {strategy}: no dim plays a model-parallel role ({', '.join(MODEL_PARALLEL_ROLES)}; the model's "
            f"dims: {listed}); map one, e.g. --roles mlp=DIM"
        )
    return present


def _roles(mesh_shape: MeshShape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(data axes, model axes) for tensor-parallel strategies: ``model`` (on a 1D mesh, its only
    axis) is the model axis, every other axis a data axis."""
    names = tuple(mesh_shape)
    if len(names) == 1:
        return (), names
    model = tuple(a for a in names if a == "model") or names[-1:]
    return tuple(a for a in names if a not in model), model


def _all_axes(mesh_shape: MeshShape) -> tuple[str, ...]:
    return tuple(a for a in mesh_shape if mesh_shape[a] > 1)


def _tp(roles: Mapping[str, str], axes: tuple[str, ...]) -> Wanted:
    """Every model-parallel dim of the model on ``axes``."""
    return {roles[r]: axes for r in MODEL_PARALLEL_ROLES if r in roles}


def data_parallel(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    notes: list[str] = []
    batch = resolve_roles(graph, "dp", roles, model_parallel=False)["batch"]
    axes = _all_axes(mesh_shape)
    layouts = _assign(graph, mesh_shape, lambda t: {} if t.role == "param" else {batch: axes}, notes)
    return Baseline("dp", layouts, notes)


def fsdp(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    """ZeRO-3: batch on all axes; every param split on its largest dim the axes divide."""
    notes: list[str] = []
    batch = resolve_roles(graph, "fsdp", roles, model_parallel=False)["batch"]
    axes = _all_axes(mesh_shape)
    factor = math.prod(mesh_shape[a] for a in axes)

    def want(t: Tensor) -> Wanted:
        if t.role != "param":
            return {batch: axes}
        fits = [(size, i) for i, size in enumerate(t.shape) if size % factor == 0]
        if not fits:
            if t.shape and max(t.shape) >= factor:
                notes.append(f"{t.name}: no dim divisible by {factor}: replicated")
            return {}
        _, i = max(fits)
        return {t.dims[i]: axes}

    layouts = _assign(graph, mesh_shape, want, notes)
    small = [n for n in notes if n.endswith(": replicated") and ": no dim" in n]
    if len(small) > 3:  # many small params (biases, norms): say it once
        notes = [n for n in notes if n not in small] + [f"{len(small)} params have no dim divisible by {factor}: replicated"]
    return Baseline("fsdp", layouts, notes)


def _megatron_want(graph: Graph, mesh_shape: MeshShape, strategy: str, roles: Roles | None) -> Callable[[Tensor], Wanted]:
    present = resolve_roles(graph, strategy, roles, model_parallel=True)
    data, model = _roles(mesh_shape)
    rules = _tp(present, model)

    def want(t: Tensor) -> Wanted:
        return rules if t.role == "param" else {present["batch"]: data, **rules}

    return want


def megatron(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    notes: list[str] = []
    want = _megatron_want(graph, mesh_shape, "megatron", roles)
    return Baseline("megatron", _assign(graph, mesh_shape, want, notes), notes)


def megatron_sp(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    """Megatron tensor parallelism plus sequence parallelism: the activations between the
    tensor-parallel regions (those with ``embed`` and ``seq`` but no model-parallel dim) are
    split on ``seq`` over the model axis instead of replicated."""
    notes: list[str] = []
    present = resolve_roles(graph, "megatron-sp", roles, model_parallel=True)
    for role in ("seq", "embed"):
        if role not in present:
            raise MeshjaxError(
                f"baseline megatron-sp: no dim plays the {role} role (no dim {(roles or {}).get(role, role)!r}; the "
                f"model's dims: {', '.join(sorted(graph.dim_names))}); map it, e.g. --roles {role}=DIM"
            )
    mega = _megatron_want(graph, mesh_shape, "megatron-sp", roles)
    _, model = _roles(mesh_shape)
    parallel = {present[r] for r in MODEL_PARALLEL_ROLES if r in present}
    seq, embed = present["seq"], present["embed"]

    def want(t: Tensor) -> Wanted:
        rules = mega(t)
        if t.role == "param" or parallel & set(t.dims) or not {seq, embed} <= set(t.dims):
            return rules
        return {**rules, seq: model}

    return Baseline("megatron-sp", _assign(graph, mesh_shape, want, notes), notes)


MTF_RULES = {"batch": ("data",), "mlp": ("model",), "heads": ("model",), "vocab": ("model",)}
"""Mesh-TensorFlow's rules, by role."""


def mesh_tensorflow(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    notes: list[str] = []
    present = resolve_roles(graph, "mtf", roles, model_parallel=True)
    rules = {present[r]: a for r, a in MTF_RULES.items() if r in present}
    missing = sorted({a for axes in rules.values() for a in axes} - set(mesh_shape))
    if missing:
        notes.append(f"mesh has no axis {', '.join(missing)}: those rules dropped")
    return Baseline("mtf", _assign(graph, mesh_shape, lambda t: rules, notes), notes)


def gspmd_2d(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    notes: list[str] = []
    present = resolve_roles(graph, "gspmd", roles, model_parallel=True)
    model = _tp(present, ("model",))
    weights = {**({present["embed"]: ("data",)} if "embed" in present else {}), **model}
    acts = {present["batch"]: ("data",), **model}
    if not {"data", "model"} <= set(mesh_shape):
        notes.append(f"mesh has no axis {', '.join(sorted({'data', 'model'} - set(mesh_shape)))}: those rules dropped")
    return Baseline("gspmd", _assign(graph, mesh_shape, lambda t: weights if t.role == "param" else acts, notes), notes)


def xla_propagation(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    notes: list[str] = []
    mega = _megatron_want(graph, mesh_shape, "xla-prop", roles)
    layouts = _assign(graph, mesh_shape, lambda t: mega(t) if t.role in ("param", "input") else None, notes)
    return Baseline("xla-prop", layouts, notes, partial=True)


BASELINES: dict[str, Callable[..., Baseline]] = {
    "dp": data_parallel,
    "fsdp": fsdp,
    "megatron": megatron,
    "megatron-sp": megatron_sp,
    "mtf": mesh_tensorflow,
    "gspmd": gspmd_2d,
    "xla-prop": xla_propagation,
}
"""Every baseline by name, in the order tables list them."""


def baseline(name: str, graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> Baseline:
    """Strategy ``name`` on ``mesh_shape``; ``roles`` maps dim roles to the model's dims."""
    try:
        fn = BASELINES[name]
    except KeyError:
        raise MeshjaxError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}") from None
    return fn(graph, dict(mesh_shape), roles)


SEQUENCE_ROLES = ("seq", "embed")
"""The roles ``megatron-sp`` needs besides Megatron's."""


def applies(name: str, graph: Graph, roles: Roles | None = None) -> bool:
    """Whether the model has the dims strategy ``name`` needs beyond ``batch`` and a
    model-parallel role: ``megatron-sp`` needs a ``seq`` and an ``embed`` dim (an MLP has none,
    so a table of every baseline leaves it out; asking for it by name is an error)."""
    if name != "megatron-sp":
        return True
    return all((roles or {}).get(r, r) in graph.dim_names for r in SEQUENCE_ROLES)


def all_baselines(graph: Graph, mesh_shape: MeshShape, roles: Roles | None = None) -> list[Baseline]:
    """Every baseline that :func:`applies` to the model."""
    return [fn(graph, dict(mesh_shape), roles) for name, fn in BASELINES.items() if applies(name, graph, roles)]


# --- pricing an assignment -------------------------------------------------------------------


def predict(
    graph: Graph,
    mesh_shape: MeshShape,
    layouts: Mapping[str, Layout],
    hardware: str | Hardware = "h100-node",
    train: bool = False,
    *,
    strict: bool = False,
    optimizer: Optimizer | str | None = None,
    problem: Problem | None = None,
):
    """Price a manual assignment with the solver's cost model: ``(plan, notes)``.

    Each decision (a source tensor, or an op's strategy, which fixes its result's layout) is
    limited to the options whose layout is the one given; where several strategies give that
    layout (they differ in operand layouts, hence reshards) the cheapest is taken. Tensors with
    no layout given are left free and chosen by the solver: an optimistic price for what XLA's
    propagation does with them. A layout that is not among a decision's options is reported in
    ``notes`` and that decision left free too (``strict=True`` raises instead). ``optimizer``:
    whose state training keeps (default Adam). ``problem``: an
    unconstrained :func:`~meshjax.solver.problem.build_problem` of the same graph, mesh,
    hardware and mode, to reuse across assignments.
    """
    start = time.perf_counter()
    mesh_shape = dict(mesh_shape)
    hw = get_hardware(hardware)
    if problem is None:
        problem = build_problem(graph, mesh_shape, hw, train=train, optimizer=optimizer)
    notes: list[str] = []
    allowed = []
    for node in problem.nodes:
        given = [layouts[n] for n in node.members if n in layouts]
        everything = np.arange(len(node.options))
        if not given:
            allowed.append(everything)
            continue
        want = given[0]
        if any(g.axes != want.axes for g in given[1:]):
            notes.append(f"{node.key}: tied instances have different layouts; priced as {want}")
        keep = np.array([i for i, l in enumerate(node.result_layouts) if l.axes == want.axes], dtype=np.int64)
        if keep.size == 0:
            what = f"op {node.op.name!r} has no strategy giving" if node.op is not None else "no valid layout is"
            message = f"{node.key}: {what} {want}; priced as the solver's choice"
            if strict:
                raise InfeasibleError(message)
            notes.append(message)
            keep = everything
        allowed.append(keep)
    restricted = restrict(problem, allowed).problem
    solution = solve_ilp(restricted)
    from meshjax.solve import plan_from_choice

    plan = plan_from_choice(restricted, solution, time.perf_counter() - start)
    return plan, notes


__all__ = [
    "BASELINES",
    "Baseline",
    "MODEL_PARALLEL_ROLES",
    "MTF_RULES",
    "ROLES",
    "parse_roles",
    "resolve_roles",
    "SEQUENCE_ROLES",
    "all_baselines",
    "applies",
    "baseline",
    "data_parallel",
    "fsdp",
    "gspmd_2d",
    "megatron",
    "megatron_sp",
    "mesh_tensorflow",
    "predict",
    "xla_propagation",
]
