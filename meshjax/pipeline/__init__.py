"""Pipeline parallelism: a stage mesh axis over which a scanned layer stack is split into
contiguous stages and fed micro-batches (:mod:`.schedule` the record and timeline, :mod:`.lower`
the SPMD program, :mod:`.plan` the pipelined plan; its cost is :mod:`meshjax.cost.pipeline`)."""

from meshjax.pipeline.schedule import SCHEDULES, Pipeline, Slot, timeline

__all__ = ["Pipeline", "SCHEDULES", "Slot", "timeline"]
