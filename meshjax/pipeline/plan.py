"""A pipelined plan: the in-stage :class:`~meshjax.plan.Plan` (layouts over the mesh axes other
than the stage axis) plus the :class:`~meshjax.pipeline.schedule.Pipeline` that runs the layer
stack over the stage axis. It reads like a ``Plan`` (specs, state specs, ``program``,
``summary``, ``to_json``), so training and checkpointing take either.

Example::

    >>> plan = solve_pipelined(graph, {"data": 2, "model": 2, "stage": 2}, train=True)   # doctest: +SKIP
    >>> plan.pipeline.stages, plan.specs["blocks/mlp/w_in"]
    (2, PartitionSpec('stage', None, 'model'))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jax.sharding import Mesh, PartitionSpec

from meshjax.errors import InfeasibleError, LayoutError
from meshjax.graph import Graph
from meshjax.layout import Layout
from meshjax.pipeline.lower import PipelinedProgram, staged_layouts
from meshjax.pipeline.schedule import Pipeline
from meshjax.plan import Plan


@dataclass
class PipelinedPlan:
    """``stage_plan`` lays out one stage (its ``mesh_shape`` lacks the stage axis); ``graph`` is
    the whole model's graph the program is traced from; ``mesh_shape`` is the whole mesh."""

    stage_plan: Plan
    pipeline: Pipeline
    graph: Graph
    mesh_shape: dict[str, int]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "stage_plan":
            raise AttributeError(name)
        return getattr(self.stage_plan, name)

    @property
    def layouts(self) -> dict[str, Layout]:
        return staged_layouts(self.graph, self.stage_plan.layouts, self.pipeline)

    @property
    def specs(self) -> dict[str, PartitionSpec]:
        return {name: layout.spec() for name, layout in self.layouts.items()}

    @property
    def param_specs(self) -> dict[str, PartitionSpec]:
        specs = self.specs
        return {t.name: specs[t.name] for t in self.graph.params}

    @property
    def state_layouts(self) -> dict[str, Layout]:
        return staged_layouts(self.graph, self.stage_plan.state_layouts, self.pipeline)

    @property
    def state_specs(self) -> dict[str, PartitionSpec]:
        return {name: layout.spec() for name, layout in self.state_layouts.items()}

    def program(self, fn: Callable, mesh: Mesh) -> PipelinedProgram:
        shape = dict(zip(mesh.axis_names, mesh.devices.shape))
        if shape != self.mesh_shape:
            raise InfeasibleError(f"plan is for mesh {self.mesh_shape}, got {shape}")
        return PipelinedProgram(fn, self.graph, mesh, self.stage_plan.layouts, self.stage_plan.operand_layouts, self.pipeline)

    def summary(self) -> str:
        pipe = self.pipeline
        return (
            f"pipeline: {pipe.stages} stages over {pipe.axis!r}, {pipe.microbatches} micro-batches ({pipe.schedule}); "
            f"in-stage {self.stage_plan.summary()}"
        )

    def to_json(self) -> dict[str, Any]:
        out = self.stage_plan.to_json()
        out["mesh"] = dict(self.mesh_shape)
        out["pipeline"] = self.pipeline.to_json()
        return out


def stage_mesh(mesh_shape: dict[str, int], axis: str) -> dict[str, int]:
    """The mesh one stage lays its tensors out on: every axis but the stage axis."""
    if axis not in mesh_shape:
        raise InfeasibleError(f"pipeline: mesh axis {axis!r} is not in the mesh {mesh_shape}")
    return {a: n for a, n in mesh_shape.items() if a != axis}


def dim_size(graph: Graph, dim: str) -> int:
    """The size of ``dim`` in ``graph`` (one-line error when no tensor has it)."""
    for tensor in graph.tensors.values():
        if dim in tensor.dims:
            return tensor.shape[tensor.dims.index(dim)]
    raise LayoutError(f"pipeline: no tensor of the graph has a dim {dim!r} (pipelining needs a scan over it)")


def check_graph(graph: Graph, pipe: Pipeline) -> None:
    """One-line errors for a graph ``pipe`` cannot split (layer stack, batch)."""
    if not any(b.kind == "scan" for b in graph.blocks.values()):
        raise LayoutError(f"pipeline: the model has no scan over {pipe.dim!r} (set scan_layers=true)")
    pipe.check(dim_size(graph, pipe.dim), dim_size(graph, pipe.batch_dim))


def solve_pipelined(
    graph: Graph,
    mesh: Mesh | dict[str, int],
    *,
    axis: str = "stage",
    microbatches: int | None = None,
    schedule: str = "gpipe",
    **solve_kwargs: Any,
) -> PipelinedPlan:
    """Pipeline ``graph``'s layer scan over mesh axis ``axis`` with ``microbatches`` (default:
    as many as stages) and solve the in-stage layouts on the other axes."""
    from meshjax.solve import solve

    mesh_shape = dict(zip(mesh.axis_names, mesh.devices.shape)) if isinstance(mesh, Mesh) else dict(mesh)
    inner = stage_mesh(mesh_shape, axis)
    pipe = Pipeline(axis=axis, stages=mesh_shape[axis], microbatches=microbatches or mesh_shape[axis], schedule=schedule)
    check_graph(graph, pipe)
    stage_plan = solve(graph, inner, **solve_kwargs)
    return PipelinedPlan(stage_plan, pipe, graph, mesh_shape)


__all__ = ["PipelinedPlan", "solve_pipelined", "stage_mesh"]
