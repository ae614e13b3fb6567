"""Draw one training step of a pipeline, GPipe and 1F1B, from :func:`meshjax.pipeline.timeline`.

    $ python benchmarks/pipeline_schedule.py            # writes docs/pipeline_schedule.png

Each row is a stage, each box a micro-batch's forward (F, one slot) or backward (B, two slots);
white is the bubble. Both schedules take ``(m + p - 1) * 3`` slots; 1F1B starts backwards early,
so the first stage holds at most ``p`` micro-batches of activations instead of ``m``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meshjax.pipeline import Pipeline, timeline  # noqa: E402

OUT = Path(__file__).parent.parent / "docs" / "pipeline_schedule.png"


def draw(ax, stages: int, microbatches: int, schedule: str) -> None:
    colours = plt.get_cmap("tab10")
    for slot in timeline(stages, microbatches, schedule):
        shade = colours(slot.microbatch % 10)
        ax.barh(slot.stage, slot.duration, left=slot.time, height=0.8, color=shade,
                alpha=1.0 if slot.kind == "F" else 0.55, edgecolor="black", linewidth=0.6)
        ax.text(slot.time + slot.duration / 2, slot.stage, f"{slot.kind}{slot.microbatch}", ha="center", va="center", fontsize=7)
    pipe = Pipeline(stages=stages, microbatches=microbatches, schedule=schedule)
    ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (forward slots)")
    ax.set_title(f"{schedule.upper()}: p={stages}, m={microbatches}, bubble {pipe.bubble_fraction:.0%}, "
                 f"stage 0 holds {pipe.in_flight} micro-batches")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    fig, axes = plt.subplots(2, 1, figsize=(12, 5.5), sharex=True)
    for ax, schedule in zip(axes, ("gpipe", "1f1b")):
        draw(ax, args.stages, args.microbatches, schedule)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
