"""The graph one pipeline stage runs in one step, for the solver to lay out and price.

It is the model's graph with ``L/p`` layers (one stage's share) where everything outside the
layer scan (the embedding, the head, the loss) has the whole batch, and everything inside it one
micro-batch, run ``(L/p) * (m + p - 1)`` times per step: the scan block's trip count. That is
what :mod:`meshjax.pipeline.lower` runs on every device of a stage: the SPMD program computes in
every one of the ``m + p - 1`` time slots, bubble included, and the parts outside the pipeline
once on the whole batch. A 1F1B schedule runs what comes after the scan (the head and the
loss) once per micro-batch inside the pipeline's loop: in its stage graph those ops are a block
of ``m`` trips at the micro-batch's size (:data:`AFTER`). The graph is spliced from two traces of the same function (``L/p``
layers at the whole batch and at one micro-batch); names agree because the code is the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from meshjax.errors import LayoutError
from meshjax.graph import Block, Graph
from meshjax.pipeline.schedule import Pipeline

TraceFor = Callable[[Mapping[str, int]], Graph]
"""``trace_for(overrides) -> Graph``: the model traced with some sizes replaced, e.g.
``{"batch": 4, "layers": 2}``."""


def scan_block(graph: Graph, pipe: Pipeline) -> str:
    """The name of the scan block whose stacked params carry ``pipe.dim``."""
    scans = [b for b in graph.blocks.values() if b.kind == "scan"]
    for block in scans:
        if any(t.block is None and t.role == "param" and pipe.dim in t.dims for t in graph.tensors.values()):
            return block.name
    raise LayoutError(f"pipeline: the model has no scan over {pipe.dim!r} (set scan_layers=true)")


def dim_size(graph: Graph, dim: str) -> int:
    """The size of ``dim`` in ``graph`` (one-line error when no tensor has it)."""
    for tensor in graph.tensors.values():
        if dim in tensor.dims:
            return tensor.shape[tensor.dims.index(dim)]
    raise LayoutError(f"pipeline: no tensor of the graph has a dim {dim!r} (pipelining needs a scan over it)")


def stage_graph(trace_for: TraceFor, full: Graph, pipe: Pipeline) -> Graph:
    """One stage's graph (see the module doc) of the model whose whole graph is ``full``."""
    block = scan_block(full, pipe)
    layers, batch = dim_size(full, pipe.dim), dim_size(full, pipe.batch_dim)
    pipe.check(layers, batch)
    per_stage = layers // pipe.stages
    whole = trace_for({pipe.dim: per_stage})
    micro = trace_for({pipe.dim: per_stage, pipe.batch_dim: batch // pipe.microbatches})
    if [op.name for op in whole.ops] != [op.name for op in micro.ops]:
        raise LayoutError("pipeline: the model traces to different ops at another batch size; it cannot be staged")
    inside = {name for name, t in micro.tensors.items() if t.block == block}
    after = after_scan(micro, block) if pipe.schedule == "1f1b" else set()
    tensors = {
        name: (micro.tensors[name] if name in inside else
               dataclasses.replace(micro.tensors[name], block=AFTER) if name in after else t)
        for name, t in whole.tensors.items()
    }
    ops = [
        m if m.block == block else dataclasses.replace(m, block=AFTER) if m.output in after else w
        for w, m in zip(whole.ops, micro.ops)
    ]
    blocks = dict(whole.blocks)
    blocks[block] = dataclasses.replace(blocks[block], trip_count=per_stage * pipe.iterations)
    if after:
        blocks[AFTER] = Block(AFTER, "scan", pipe.microbatches)
    return Graph(tensors, ops, blocks, whole.outputs, whole.signature, whole.out_tree)


AFTER = "after_scan"
"""The block of a 1F1B stage graph that holds what runs after the pipelined scan (a decoder's
head and loss): once per micro-batch, inside the pipeline's loop."""


def after_scan(graph: Graph, block: str) -> set[str]:
    """The scan ``block``'s final carries and the ops downstream of them (by output name): a
    final carry is pinned per micro-batch too."""
    ends = {op.output for op in graph.ops if op.kind == "scan_carry" and graph.producer[op.inputs[0]].block == block}
    out: set[str] = set(ends)
    for op in graph.ops:
        if op.block is None and any(i in ends or i in out for i in op.inputs):
            out.add(op.output)
    return out


def preset_tracer(name: str, **overrides: Any) -> TraceFor:
    """``trace_for`` of a model preset (abstract: nothing is allocated)."""
    import meshjax as mj
    from meshjax import models

    def trace_for(sizes: Mapping[str, int]) -> Graph:
        ex = models.example(name, abstract=True, **{**overrides, **sizes})
        return mj.trace(ex.loss, ex.params, *ex.batch)

    return trace_for


__all__ = ["AFTER", "TraceFor", "after_scan", "dim_size", "preset_tracer", "scan_block", "stage_graph"]
