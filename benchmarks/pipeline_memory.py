"""Pipelined training memory: compiled against predicted, per device, on 8 simulated CPU devices.

``gpt-tiny`` with 4 scanned layers (batch 64, seq 32), Adam, the solver's in-stage layouts, on
``2x2x2 (data, model, stage)`` and ``4x2 (stage, model)``, for GPipe, GPipe with stage remat and
1F1B at a few micro-batch counts. Compiled memory is XLA's ``memory_analysis`` of the whole
training step (arguments + outputs + temporaries - aliased, as :mod:`meshjax.verify` reads it);
predicted is the plan's memory row, whose breakdown (the cost model's, one owner) is printed
beside it. The band is :data:`meshjax.verify.MEMORY_BAND`.

Beside them, XLA's own *live peak*: the bytes of every buffer live at the busiest instant of
the compiled step (its live-range dump, each buffer once), before the heap simulator packs the
temporaries into one allocation. ``memory_analysis`` reports that allocation, whose packing of
buffers with different lifetimes across nested loops can leave it well above the live peak.

    $ python benchmarks/pipeline_memory.py            # ~5-10 minutes on 2 cores
    $ python benchmarks/pipeline_memory.py --quick    # three cells

Writes ``benchmarks/results/pipeline_memory[_quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

DUMP = tempfile.mkdtemp(prefix="pipeline_memory_")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_module_re=.*jit_step.*"
                           " --xla_dump_hlo_pass_re=NONE").strip()

import meshjax.devices  # noqa: E402

meshjax.devices.use_cpu_devices(8)

import optax  # noqa: E402

from meshjax import data, models  # noqa: E402
from meshjax.devices import make_mesh  # noqa: E402
from meshjax.hlo import inspect_compiled  # noqa: E402
from meshjax.pipeline.plan import solve_pipelined  # noqa: E402
from meshjax.pipeline.stage_graph import preset_tracer  # noqa: E402
from meshjax.train import make_train_step  # noqa: E402
from meshjax.verify import MEMORY_BAND  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SETTINGS = dict(layers=4, scan_layers=True, vocab=data.VOCAB, batch=64, seq=32)
MESHES = ({"data": 2, "model": 2, "stage": 2}, {"stage": 4, "model": 2})
SCHEDULES = (("gpipe", False), ("gpipe", True), ("1f1b", True))
MICROBATCHES = (4, 16)
QUICK = [  # (mesh, schedule, remat, m): one cell per schedule
    (MESHES[0], "gpipe", False, 8), (MESHES[0], "1f1b", True, 16), (MESHES[1], "gpipe", True, 8),
]


def cells(quick: bool):
    if quick:
        yield from QUICK
        return
    for mesh in MESHES:
        for schedule, remat in SCHEDULES:
            for m in MICROBATCHES:
                yield mesh, schedule, remat, m


def live_peak(dump: str = DUMP) -> int | None:
    """Bytes live at XLA's peak in the newest step compiled into ``dump``: the buffers its
    live-range dump lists at the peak, each storage slot (allocation, offset) once (a loop's
    state and the value it aliases share one)."""
    files = sorted(Path(dump).glob("module_*jit_step*live-range.txt"))
    if not files:
        return None
    ranges = files[-1]
    text = ranges.read_text()
    if "Live ranges at" not in text:
        return None
    peak = text[text.index("Live ranges at"):text.index("Stack trace breakdown") if "Stack trace breakdown" in text else None]
    slot: dict[str, tuple[int, int]] = {}
    allocation = -1
    assignment = Path(str(ranges).replace("-live-range.txt", "-buffer-assignment.txt"))
    for line in assignment.read_text().splitlines():
        if m := re.match(r"allocation (\d+):", line):
            allocation = int(m.group(1))
        elif m := re.match(r"\s*value: <\d+ (\S+?)(?: \(phi\))? @\d+> \(size=\d+,offset=(\d+)\)", line):
            slot[m.group(1)] = (allocation, int(m.group(2)))
    seen: dict[tuple, int] = {}
    for name, size in re.findall(r"^\s+(\S+?): (\d+) bytes", peak, re.M):
        key = slot.get(name) or slot.get(name.removesuffix("{}")) or (name,)
        seen.setdefault(key, int(size))
    return sum(seen.values())


def measure(mesh_shape: dict, schedule: str, remat: bool, m: int) -> dict:
    """One cell: the plan's predicted memory (and its breakdown) beside the compiled step's."""
    ex = models.example("gpt-tiny", key=0, **SETTINGS)
    plan = solve_pipelined(preset_tracer("gpt-tiny", **SETTINGS), mesh_shape, microbatches=m, schedule=schedule,
                           remat=remat, train=True, hardware="cpu-sim")
    trainer = make_train_step(plan, ex.loss, make_mesh(mesh_shape), optax.adam(1e-3))
    report = inspect_compiled(trainer.lower(trainer.abstract_state(), *ex.batch).compile(), trainer.mesh)
    compiled = report.memory
    predicted = plan.peak_memory_bytes
    live = live_peak()
    for path in Path(DUMP).iterdir():  # the next cell's dump starts afresh (they are large)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {
        "mesh": mesh_shape, "schedule": schedule, "remat": remat, "microbatches": m,
        "predicted_bytes": predicted, "compiled_bytes": compiled["peak_bytes"],
        "ratio": compiled["peak_bytes"] / predicted,
        "live_peak_bytes": live, "live_ratio": live / predicted if live else None,
        "compiled": {k: compiled[k] for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")},
        "predicted_breakdown": plan.memory_breakdown(),
        "comm_ratio": report.comm_bytes / plan.comm_bytes if plan.comm_bytes else None,
    }


def mesh_label(mesh: dict) -> str:
    return "x".join(str(n) for n in mesh.values()) + " (" + ",".join(mesh) + ")"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rows = []
    for mesh, schedule, remat, m in cells(args.quick):
        t0 = time.perf_counter()
        r = measure(mesh, schedule, remat, m)
        rows.append(r)
        print(f"{mesh_label(mesh)} {schedule}{' remat' if remat else ''} m={m}: compiled {r['compiled_bytes']:,} "
              f"predicted {r['predicted_bytes']:,.0f} ratio {r['ratio']:.3f} live {r['live_ratio']:.3f} comm {r['comm_ratio']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    lo, hi = MEMORY_BAND
    name = "pipeline_memory_quick" if args.quick else "pipeline_memory"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"settings": SETTINGS, "band": [lo, hi], "rows": rows}, indent=2))
    lines = [
        "# Pipelined training memory: compiled / predicted bytes per device",
        "",
        f"`gpt-tiny` {SETTINGS}, Adam, 8 simulated CPU devices; compiled = XLA memory_analysis of the training "
        f"step (arguments + outputs + temporaries - aliased). Band {lo:.2f}-{hi:.2f}. Generated by "
        "`benchmarks/pipeline_memory.py`.",
        "",
        "| mesh | schedule | m | compiled | predicted | compiled / predicted | in band | XLA live peak / predicted | comm compiled / predicted |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        sched = r["schedule"] + (", stage remat" if r["remat"] and r["schedule"] == "gpipe" else "")
        lines.append(
            f"| {mesh_label(r['mesh'])} | {sched} | {r['microbatches']} | {r['compiled_bytes']:,} | "
            f"{r['predicted_bytes']:,.0f} | {r['ratio']:.3f} | {'yes' if lo <= r['ratio'] <= hi else 'no'} | "
            f"{r['live_ratio']:.3f} | {r['comm_ratio']:.3f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
