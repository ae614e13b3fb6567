"""The pipeline a plan runs: which mesh axis holds the stages, how many micro-batches, which
schedule, and the timeline of one step (what every stage does in every time slot).

Example::

    >>> pipe = Pipeline(axis="stage", stages=4, microbatches=8)
    >>> pipe.bubble_fraction
    0.2727272727272727
    >>> [(s.stage, s.microbatch, s.kind) for s in timeline(2, 2, "gpipe")[:3]]
    [(0, 0, 'F'), (0, 1, 'F'), (1, 0, 'F')]
"""

from __future__ import annotations

from dataclasses import dataclass

from meshjax.errors import LayoutError

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class Pipeline:
    """A stage mesh axis of ``stages`` devices over which the scan over ``dim`` (the layer
    stack) is split into contiguous stages, fed ``microbatches`` slices of ``batch_dim``.
    With ``remat`` each stage keeps only its input per micro-batch and recomputes its forward
    in the backward pass."""

    axis: str = "stage"
    stages: int = 2
    microbatches: int = 2
    schedule: str = "gpipe"
    remat: bool = False
    dim: str = "layers"
    batch_dim: str = "batch"

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise LayoutError(f"pipeline: stages must be >= 1, got {self.stages}")
        if self.microbatches < 1:
            raise LayoutError(f"pipeline: microbatches must be >= 1, got {self.microbatches}")
        if self.schedule not in SCHEDULES:
            raise LayoutError(f"pipeline: unknown schedule {self.schedule!r} (known: {', '.join(SCHEDULES)})")
        if self.schedule == "1f1b" and not self.remat:
            # 1F1B's backward recomputes its stage from the kept input (it keeps no activations).
            object.__setattr__(self, "remat", True)

    @property
    def iterations(self) -> int:
        """Forward time slots of one step: every micro-batch passes every stage, ``m + p - 1``."""
        return self.microbatches + self.stages - 1

    @property
    def bubble_fraction(self) -> float:
        """The idle share of every stage's step, ``(p - 1) / (m + p - 1)`` (GPipe and 1F1B alike)."""
        return (self.stages - 1) / self.iterations

    @property
    def in_flight(self) -> int:
        """Micro-batches whose activations the first stage holds at once in the asynchronous
        schedule (:func:`timeline`): GPipe all ``m``, 1F1B at most ``p``. The SPMD program runs
        lock-step slots and holds :attr:`held`."""
        return self.microbatches if self.schedule == "gpipe" else min(self.stages, self.microbatches)

    @property
    def held(self) -> int:
        """Micro-batches of stage inputs (with ``remat``) or activations every stage of the lowered
        program keeps: GPipe one per forward slot, ``m + p - 1``; 1F1B a ring of ``min(m, 2p - 1)``
        (in one SPMD program a micro-batch takes ``2p - 2`` slots from the first stage to the
        last and back, see :mod:`meshjax.pipeline.one_f_one_b`)."""
        if self.schedule == "gpipe":
            return self.iterations
        return min(self.microbatches, 2 * self.stages - 1)

    def check(self, layers: int, batch: int) -> None:
        """One-line errors for a layer stack or batch the pipeline cannot split."""
        if layers % self.stages:
            raise LayoutError(
                f"pipeline: dim {self.dim!r} of size {layers} does not split into {self.stages} stages "
                f"(mesh axis {self.axis!r})"
            )
        if batch % self.microbatches:
            raise LayoutError(
                f"pipeline: dim {self.batch_dim!r} of size {batch} does not split into {self.microbatches} micro-batches"
            )

    def to_json(self) -> dict:
        return {
            "axis": self.axis, "stages": self.stages, "microbatches": self.microbatches,
            "schedule": self.schedule, "remat": self.remat,
        }


@dataclass(frozen=True)
class Slot:
    """Stage ``stage`` runs the forward (``F``) or backward (``B``) of ``microbatch`` in time
    slot ``time`` (a backward takes ``backward_ratio`` forward slots)."""

    time: float
    duration: float
    stage: int
    microbatch: int
    kind: str


def timeline(stages: int, microbatches: int, schedule: str = "gpipe", backward_ratio: float = 2.0) -> list[Slot]:
    """Every (stage, micro-batch, F/B) of one step with its start time in forward-slot units.

    GPipe runs all forwards, then all backwards in reverse order; 1F1B (PipeDream-flush) runs
    ``p - s - 1`` warm-up forwards on stage ``s``, then alternates one forward with one backward.
    Both are computed by list scheduling (each op starts when its stage is free and its input from
    the neighbouring stage has arrived), so the picture and the bubble come from the same rule.

    >>> slots = timeline(4, 8, "gpipe")
    >>> max(s.time + s.duration for s in slots) / ((8 + 4 - 1) * 3)   # GPipe: (m + p - 1)(1 + 2)
    1.0
    """
    p, m = stages, microbatches
    if schedule not in SCHEDULES:
        raise LayoutError(f"unknown schedule {schedule!r} (known: {', '.join(SCHEDULES)})")
    orders: list[list[tuple[str, int]]] = []
    for s in range(p):
        if schedule == "gpipe":
            order = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        else:
            warm = min(p - s - 1, m)
            order = [("F", i) for i in range(warm)]
            f, b = warm, 0
            while b < m:
                if f < m:
                    order.append(("F", f))
                    f += 1
                order.append(("B", b))
                b += 1
        orders.append(order)
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * p
    pos = [0] * p
    slots: list[Slot] = []
    while any(pos[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] >= len(orders[s]):
                continue
            kind, i = orders[s][pos[s]]
            dep = ("F", s - 1, i) if kind == "F" and s > 0 else ("B", s + 1, i) if kind == "B" and s < p - 1 else None
            if kind == "B" and s == p - 1:
                dep = ("F", s, i)
            if dep is not None and dep not in done:
                continue
            duration = 1.0 if kind == "F" else backward_ratio
            start = max(free[s], done[dep] if dep is not None else 0.0)
            slots.append(Slot(start, duration, s, i, kind))
            done[(kind, s, i)] = start + duration
            free[s] = start + duration
            pos[s] += 1
            progressed = True
        if not progressed:  # pragma: no cover - the orders above never deadlock
            raise RuntimeError("pipeline schedule deadlocked")
    slots.sort(key=lambda x: (x.time, x.stage))
    return slots


__all__ = ["Pipeline", "SCHEDULES", "Slot", "timeline"]
