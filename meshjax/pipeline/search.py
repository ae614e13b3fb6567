"""The mesh search with a stage axis: every ``data x stage x model`` factorisation of a device
count whose stage count splits the layer stack, solved (pipelined where ``stage > 1``, plainly
where it is 1), best predicted step time first.

The candidates are :func:`meshjax.solve.factorisations` into three axes, kept when the stage
count divides the layers and the ``model`` axis fits in one node (tensor parallelism all-reduces
every layer's activations; across nodes it is never the cheaper choice, and leaving it out
keeps the search to a few dozen meshes). Axis order is ``data, stage, model``: the model axis
innermost, on the node's fast link, the stage axis next.

Example::

    >>> mesh_candidates(8, layers=4, max_model=2)
    [{'data': 8, 'model': 1}, {'data': 4, 'model': 2}, {'data': 4, 'stage': 2, 'model': 1}, {'data': 2, 'stage': 2, 'model': 2}, {'data': 2, 'stage': 4, 'model': 1}, {'data': 1, 'stage': 4, 'model': 2}]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from meshjax.errors import InfeasibleError, LayoutError, MeshjaxError
from meshjax.pipeline.schedule import Pipeline
from meshjax.pipeline.stage_graph import TraceFor, dim_size

# Keyword arguments only the unpipelined solver takes (its memory levers); a pipeline picks
# its own micro-batches and stage remat.
_PLAIN_ONLY = ("remat", "microbatches")


def mesh_candidates(
    n_devices: int,
    layers: int,
    *,
    axes: tuple[str, str, str] = ("data", "stage", "model"),
    max_model: int | None = None,
    stage_counts: list[int] | None = None,
    model_sizes: list[int] | None = None,
) -> list[dict[str, int]]:
    """Meshes of ``n_devices`` over ``axes`` (data, stage, model): unpipelined ``data x model``
    first, then pipelined ones with ``stage > 1`` dividing ``layers`` (and in ``stage_counts``
    if given); ``model`` at most ``max_model`` (default: no limit) and in ``model_sizes`` if
    given."""
    from meshjax.solve import factorisations

    data, stage, model = axes
    if len(set(axes)) != 3:
        raise LayoutError(f"mesh search: axes {axes} must be three distinct names (data, stage, model)")
    out: list[dict[str, int]] = []
    for d, s, t in (f for f in factorisations(n_devices, 3) if len(f) == 3):
        if (max_model is not None and t > max_model) or (model_sizes is not None and t not in model_sizes):
            continue
        if s > 1 and (layers % s or (stage_counts is not None and s not in stage_counts)):
            continue
        out.append({data: d, model: t} if s == 1 else {data: d, stage: s, model: t})
    return sorted(out, key=lambda m: (m.get(stage, 1), m[model]))


def search_stages(
    trace_for: TraceFor,
    n_devices: int,
    *,
    axes: tuple[str, str, str] = ("data", "stage", "model"),
    max_model: int | None = None,
    stage_counts: list[int] | None = None,
    model_sizes: list[int] | None = None,
    schedule: str = "gpipe",
    **solve_kwargs: Any,
) -> list[tuple[dict[str, int], Any]]:
    """Solve every mesh of :func:`mesh_candidates` and return each with its plan (a
    :class:`~meshjax.plan.Plan`, a :class:`~meshjax.pipeline.plan.PipelinedPlan`, or the
    :class:`~meshjax.errors.InfeasibleError` saying why none fits), best predicted step first.

    ``trace_for(sizes)`` traces the model (:func:`~meshjax.pipeline.stage_graph.preset_tracer`);
    ``max_model`` defaults to the hardware's devices per node; ``stage_counts`` and
    ``model_sizes`` narrow the meshes further (:func:`mesh_candidates`). ``remat`` and ``microbatches``
    in ``solve_kwargs`` go to the unpipelined meshes only; pipelined ones choose their own."""
    from meshjax.cost.hardware import get_hardware
    from meshjax.pipeline.plan import solve_pipelined
    from meshjax.solve import solve

    full = trace_for({})
    probe = Pipeline(axis=axes[1])
    layers = dim_size(full, probe.dim)
    if max_model is None:
        max_model = get_hardware(solve_kwargs.get("hardware", "h100-node")).devices_per_node
    staged_kwargs = {k: v for k, v in solve_kwargs.items() if k not in _PLAIN_ONLY}
    results: list[tuple[dict[str, int], Any]] = []
    meshes = mesh_candidates(n_devices, layers, axes=axes, max_model=max_model, stage_counts=stage_counts, model_sizes=model_sizes)
    for mesh in meshes:
        try:
            if axes[1] in mesh:
                plan = solve_pipelined(trace_for, mesh, axis=axes[1], schedule=schedule, **staged_kwargs)
            else:
                plan = solve(full, mesh, **solve_kwargs)
        except MeshjaxError as err:  # infeasible, or a batch that does not split
            plan = err
        results.append((mesh, plan))
    results.sort(key=lambda r: getattr(r[1], "step_time_s", math.inf))
    return results


def best_of(results: list[tuple[Mapping[str, int], Any]]) -> tuple[dict[str, int], Any]:
    """The fastest plan of :func:`search_stages`'s results (one-line error when none fits)."""
    fitted = [(dict(m), p) for m, p in results if not isinstance(p, Exception)]
    if not fitted:
        reasons = "; ".join(f"{'x'.join(map(str, m.values()))}: {p}" for m, p in results[:2])
        raise InfeasibleError(f"mesh search: no mesh of the {len(results)} candidates fits ({reasons})")
    return min(fitted, key=lambda mp: mp[1].step_time_s)


__all__ = ["best_of", "mesh_candidates", "search_stages"]
