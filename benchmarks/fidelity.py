"""Predicted against compiled comm bytes and memory, on a grid of the solver's plans.

Grid: every small zoo model x meshes ``8``, ``4x2``, ``2x4`` x settings {no budget, three budgets
between the least memory any layout needs and the unconstrained plan's peak, the README's rules
examples} x {unrolled, scanned layers} x hardware {cpu-sim, h100-node}. Every plan is a training
plan, compiled as :func:`meshjax.verify.verify` compiles it (the whole Adam step, every tensor and
operand pinned) on simulated CPU devices, and compared by :class:`meshjax.verify.Verification`:
comm bytes as the compile target lowers the plan's collectives (XLA:CPU emits an all-reduce where
a plan priced for ``h100-node`` has a reduce-scatter), memory as XLA's ``memory_analysis``
(arguments + outputs + temporaries - aliased). Each graph is traced once per model and each
distinct program (same layouts, operand and computed layouts) compiled once.

    $ python benchmarks/fidelity.py --quick --out /tmp/fidelity          # a subset
    $ python benchmarks/fidelity.py --out benchmarks/results             # the grid, committed results

Writes ``fidelity{,_quick}.{json,md}`` and ``fidelity{,_quick}.png`` (predicted vs compiled
scatter) into ``--out`` (default: a new temporary folder), after each model.
Bands: :data:`meshjax.verify.COMM_BAND` and :data:`meshjax.verify.MEMORY_BAND` (compiled over
predicted); a budgeted row also fails when compiled memory exceeds its budget. A budgeted plan
whose compiled step exceeds the budget is solved again under the budget less XLA's overshoot, as
``meshjax plan`` does (:func:`meshjax.verify.keep_budget`); the row is the last plan, and lists
the solves before it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meshjax.devices

meshjax.devices.use_cpu_devices(8)

import jax  # noqa: E402

import meshjax as mj  # noqa: E402
from meshjax import models  # noqa: E402
from meshjax.devices import make_mesh  # noqa: E402
from meshjax.errors import MeshjaxError  # noqa: E402
from meshjax.hlo import inspect_compiled  # noqa: E402
from meshjax.solve import solve  # noqa: E402
from meshjax.solver.ilp import solve_ilp  # noqa: E402
from meshjax.verify import COMM_BAND, MEMORY_BAND, Verification, compile_plan, keep_budget, platform_of  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODELS = ["mlp-tiny", "mlp-small", "gpt-tiny", "gpt-small", "block-tiny", "llama-tiny", "moe-tiny"]
QUICK_MODELS = ["mlp-tiny", "gpt-tiny", "moe-tiny"]
MESHES = {"8": {"data": 8}, "4x2": {"data": 4, "model": 2}, "2x4": {"data": 2, "model": 4}}
QUICK_MESHES = ["4x2"]
HARDWARE = ["cpu-sim", "h100-node"]
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)  # of the way from the least memory to the unconstrained peak
# The rules examples of the README and of `meshjax plan --help`.
RULES = ["batch:data", "batch=data,mlp=model,seq=none"]


@dataclass(frozen=True)
class Setting:
    """One solve of a model on a mesh: no budget, a budget, or rules."""

    label: str
    budget: float | None = None
    rules: str | None = None


@dataclass
class Row:
    model: str
    variant: str  # "unrolled" or "scanned"
    mesh: str
    hardware: str
    setting: str
    budget: float | None
    predicted_comm_bytes: float  # as the compile target lowers the plan's collectives
    planned_comm_bytes: float  # as the plan prices them
    compiled_comm_bytes: float
    comm_ratio: float  # compiled / predicted
    predicted_memory_bytes: float
    compiled_memory_bytes: float | None
    memory_ratio: float | None
    over_budget: bool
    program: int  # index of the compiled program within its model (rows sharing one share a number)
    compile_s: float
    lowering: str | None
    off_ops: list[dict[str, Any]] = field(default_factory=list)
    # Solves whose compiled step exceeded the budget, before this row's plan (meshjax.verify.keep_budget):
    # the budget each was solved for and what it compiled to.
    budget_tries: list[dict[str, float]] = field(default_factory=list)

    @property
    def comm_ok(self) -> bool:
        return COMM_BAND[0] <= self.comm_ratio <= COMM_BAND[1]

    @property
    def memory_ok(self) -> bool:
        return self.memory_ratio is None or MEMORY_BAND[0] <= self.memory_ratio <= MEMORY_BAND[1]

    @property
    def ok(self) -> bool:
        return self.comm_ok and self.memory_ok and not self.over_budget


def variants(name: str) -> list[tuple[str, dict[str, Any]]]:
    """``("unrolled", {})`` and, for models with stacked layers, ``("scanned", {"scan_layers": True})``."""
    _, config = models.get(name)
    out = [("unrolled", {})]
    if "scan_layers" in type(config).__dataclass_fields__:
        out.append(("scanned", {"scan_layers": True}))
    return out


def _signature(plan) -> tuple:
    """What the compiled program depends on: every layout the lowering pins."""
    return (
        tuple(sorted((n, str(l)) for n, l in plan.layouts.items())),
        tuple(sorted((n, tuple(map(str, ls))) for n, ls in plan.operand_layouts.items())),
        tuple(sorted((n, str(l)) for n, l in plan.computed_layouts.items())),
        tuple(sorted((n, str(l)) for n, l in getattr(plan, "state_layouts", {}).items())),
    )


def settings_for(plan, graph) -> list[Setting]:
    """No budget, three budgets between the least memory and ``plan``'s peak, and the rules
    examples whose dims and axes the model and mesh have."""
    out = [Setting("no budget")]
    least = solve_ilp(plan.problem, objective="memory").memory
    peak = plan.peak_memory_bytes
    for f in BUDGET_FRACTIONS:
        if peak > least:
            out.append(Setting(f"budget {int(f * 100)}%", budget=least + f * (peak - least)))
    for rules in RULES:
        out.append(Setting(f"rules {rules}", rules=rules))
    return out


def run_grid(
    names: Iterable[str],
    meshes: Iterable[str],
    hardware: Iterable[str] = HARDWARE,
    *,
    variant_filter: Callable[[str], bool] = lambda v: True,
    setting_filter: Callable[[Setting], bool] = lambda s: True,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Row], list[dict[str, str]]]:
    """Solve, compile and compare every cell; returns the rows and the cells skipped (a rules
    example naming a dim or axis the model or mesh lacks, a budget no layout meets)."""
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    programs: dict[tuple, tuple[int, Any, float]] = {}
    for name in names:
        for variant, overrides in variants(name):
            if not variant_filter(variant):
                continue
            ex = models.example(name, abstract=True, **overrides)
            graph = mj.trace(ex.loss, ex.params, *ex.batch)
            for mesh_label in meshes:
                mesh_shape = MESHES[mesh_label]
                mesh = make_mesh(mesh_shape)
                for hw in hardware:
                    base = solve(graph, mesh_shape, hardware=hw, train=True)
                    for setting in settings_for(base, graph):
                        if not setting_filter(setting):
                            continue
                        cell = dict(model=name, variant=variant, mesh=mesh_label, hardware=hw, setting=setting.label)
                        try:
                            plan = base if setting.label == "no budget" else solve(
                                graph, mesh_shape, hardware=hw, train=True,
                                memory_budget=setting.budget, rules=setting.rules,
                            )
                        except MeshjaxError as err:
                            skipped.append({**cell, "why": str(err).splitlines()[0]})
                            continue
                        fresh = False

                        def measure(p):
                            nonlocal fresh
                            key = (name, variant, mesh_label, _signature(p))
                            if key not in programs:
                                fresh = True
                                start = time.perf_counter()
                                report = inspect_compiled(compile_plan(p, ex.loss, mesh, ex.params, *ex.batch), mesh)
                                programs[key] = (len(programs), report, time.perf_counter() - start)
                            return programs[key][1].memory.get("peak_bytes")

                        def resolve(budget):
                            return solve(graph, mesh_shape, hardware=hw, train=True, memory_budget=budget, rules=setting.rules)

                        try:
                            plan, tries = keep_budget(plan, setting.budget, measure, resolve)
                        except MeshjaxError as err:
                            skipped.append({**cell, "why": str(err).splitlines()[0]})
                            continue
                        measure(plan)
                        index, report, compile_s = programs[(name, variant, mesh_label, _signature(plan))]
                        rows.append(_row(cell, setting, plan, Verification(plan, report, platform_of(mesh)), index, compile_s))
                        rows[-1].budget_tries = [{"solved_for": t.solved_for, "compiled": t.compiled} for t in tries]
                        r = rows[-1]
                        log(f"{name:11s} {variant:8s} {mesh_label:3s} {hw:9s} {setting.label:34s} "
                            f"comm {r.comm_ratio:6.3f} mem {r.memory_ratio or 0:6.3f}"
                            f"{'' if r.ok else '  OUT'}{'' if fresh else ' (same program)'}")
    return rows, skipped


def _row(cell: dict[str, str], setting: Setting, plan, check: Verification, program: int, compile_s: float) -> Row:
    compiled_mem = check.compiled.memory.get("peak_bytes")
    off = sorted(check.per_op(), key=lambda r: -abs(r.compiled_bytes - r.predicted_bytes))
    return Row(
        **cell,
        budget=setting.budget,
        predicted_comm_bytes=check.predicted_comm_bytes,
        planned_comm_bytes=plan.comm_bytes,
        compiled_comm_bytes=check.compiled.comm_bytes,
        comm_ratio=check.comm_ratio,
        predicted_memory_bytes=plan.peak_memory_bytes,
        compiled_memory_bytes=compiled_mem,
        memory_ratio=check.memory_ratio,
        over_budget=setting.budget is not None and compiled_mem is not None and compiled_mem > setting.budget,
        program=program,
        compile_s=compile_s,
        lowering=check.lowering_note,
        off_ops=[
            {"op": r.op, "predicted": r.predicted_bytes, "compiled": r.compiled_bytes, "combined": r.combined}
            for r in off[:3]
            if abs(r.compiled_bytes - r.predicted_bytes) > 0.01 * max(check.compiled.comm_bytes, 1)
        ],
    )


def summary(rows: list[Row]) -> dict[str, Any]:
    """Min / median / max of both ratios and the rows outside their band."""
    comm = [r.comm_ratio for r in rows]
    mem = [r.memory_ratio for r in rows if r.memory_ratio is not None]
    stats = lambda xs: {"min": min(xs), "median": statistics.median(xs), "max": max(xs)} if xs else None  # noqa: E731
    return {
        "rows": len(rows),
        "programs": len({(r.model, r.program) for r in rows}),  # numbered per model
        "comm_ratio": stats(comm),
        "memory_ratio": stats(mem),
        "comm_out_of_band": sum(not r.comm_ok for r in rows),
        "memory_out_of_band": sum(not r.memory_ok for r in rows),
        "over_budget": sum(r.over_budget for r in rows),
        "solved_again": sum(bool(r.budget_tries) for r in rows),
    }


def summary_line(s: dict[str, Any]) -> str:
    c, m = s["comm_ratio"], s["memory_ratio"]
    return (
        f"{s['rows']} plans ({s['programs']} programs): compiled/predicted comm min {c['min']:.3f}, "
        f"median {c['median']:.3f}, max {c['max']:.3f} ({s['comm_out_of_band']} outside "
        f"{COMM_BAND[0]:.2f}-{COMM_BAND[1]:.2f}); memory min {m['min']:.3f}, median {m['median']:.3f}, "
        f"max {m['max']:.3f} ({s['memory_out_of_band']} outside {MEMORY_BAND[0]:.2f}-{MEMORY_BAND[1]:.2f}); "
        f"{s['over_budget']} budgeted plans compiled above their budget"
        + (f" ({s['solved_again']} solved again under a budget less XLA's overshoot)" if s.get("solved_again") else "")
    )


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "cores": os.cpu_count(),
        "devices": f"{jax.device_count()} simulated {jax.devices()[0].platform.upper()} devices",
    }


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# Predicted vs compiled comm and memory{' (quick)' if doc['quick'] else ''}",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, Python {m['python']}, JAX {m['jax']}, {m['devices']}; "
        f"{doc['wall_s']:.0f} s. Models: {', '.join(doc.get('models', []))}; meshes: "
        f"{', '.join(doc.get('meshes', []))}; hardware: {', '.join(doc.get('hardware', []))}.",
        "Training plans (whole Adam step) compiled on simulated CPU devices. Ratios are compiled over predicted; "
        f"comm band {COMM_BAND[0]:.2f}-{COMM_BAND[1]:.2f}, memory band {MEMORY_BAND[0]:.2f}-{MEMORY_BAND[1]:.2f}. "
        "Predicted comm is the plan's collectives as XLA:CPU lowers them (a reduce-scatter priced for h100-node "
        "is compared as the all-reduce XLA:CPU emits; *planned* is the plan's own figure).",
        "",
        f"**Summary**: {summary_line(doc['summary'])}.",
        "",
        "| model | variant | mesh | hardware | setting | planned comm B | predicted comm B | compiled comm B | comm ratio "
        "| predicted mem B | compiled mem B | mem ratio | |",
        "|" + "---|" * 13,
    ]
    for r in doc["rows"]:
        flags = []
        if not COMM_BAND[0] <= r["comm_ratio"] <= COMM_BAND[1]:
            flags.append("comm")
        if r["memory_ratio"] is not None and not MEMORY_BAND[0] <= r["memory_ratio"] <= MEMORY_BAND[1]:
            flags.append("memory")
        if r["over_budget"]:
            flags.append("over budget")
        for t in r.get("budget_tries", []):
            flags.append(f"solved for {t['solved_for']:,.0f} compiled {t['compiled']:,.0f}")
        mem = f"{r['compiled_memory_bytes']:,}" if r["compiled_memory_bytes"] is not None else "n/a"
        ratio = f"{r['memory_ratio']:.3f}" if r["memory_ratio"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['mesh']} | {r['hardware']} | {r['setting']} "
            f"| {r['planned_comm_bytes']:,.0f} | {r['predicted_comm_bytes']:,.0f} | {r['compiled_comm_bytes']:,} "
            f"| {r['comm_ratio']:.3f} | {r['predicted_memory_bytes']:,.0f} | {mem} | {ratio} | {', '.join(flags)} |"
        )
    out = [r for r in doc["rows"] if not COMM_BAND[0] <= r["comm_ratio"] <= COMM_BAND[1]]
    lines += ["", "## Comm outside its band, by op (largest differences)", ""]
    if not out:
        lines.append("None.")
    for r in out:
        ops = "; ".join(
            f"{o['op']} predicted {o['predicted']:,.0f} compiled {o['compiled']:,.0f}{' (combined)' if o['combined'] else ''}"
            for o in r["off_ops"]
        )
        lines.append(f"- {r['model']} {r['variant']} {r['mesh']} {r['hardware']} {r['setting']}: "
                     f"{r['comm_ratio']:.3f}: {ops or 'no single op stands out'}")
    if doc["skipped"]:
        lines += ["", "## Cells without a plan", ""]
        lines += [f"- {s['model']} {s['variant']} {s['mesh']} {s['hardware']} {s['setting']}: {s['why']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    names = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    for ax, (what, pred, comp, band) in zip(axes, (
        ("comm bytes / step", "predicted_comm_bytes", "compiled_comm_bytes", COMM_BAND),
        ("memory bytes / device", "predicted_memory_bytes", "compiled_memory_bytes", MEMORY_BAND),
    )):
        points = [(r[pred], r[comp], r["model"], r["variant"]) for r in doc["rows"] if r[pred] and r[comp]]
        for name in names:
            for variant, marker in (("unrolled", "o"), ("scanned", "^")):
                xs = [p for p, c, n, v in points if n == name and v == variant]
                ys = [c for p, c, n, v in points if n == name and v == variant]
                if xs:
                    ax.scatter(xs, ys, s=14, marker=marker, alpha=0.7, label=f"{name} {variant}")
        if points:
            lo = min(min(p, c) for p, c, _, _ in points) / 1.5
            hi = max(max(p, c) for p, c, _, _ in points) * 1.5
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            for f in band:
                ax.plot([lo, hi], [lo * f, hi * f], "k:", lw=0.6)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted {what}")
        ax.set_ylabel(f"compiled {what}")
        ax.set_title(f"{what} (band {band[0]:.2f}-{band[1]:.2f})", fontsize=10)
    axes[1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"models {', '.join(QUICK_MODELS)} on mesh {', '.join(QUICK_MESHES)}")
    parser.add_argument("--models", default=None, help="comma-separated presets (default: per --quick)")
    parser.add_argument("--meshes", default=None, help=f"comma-separated, of {', '.join(MESHES)} (default: per --quick)")
    parser.add_argument("--hardware", default=None, help=f"comma-separated profiles (default: {', '.join(HARDWARE)})")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder for the JSON, markdown and plot (default: a new temporary folder; "
                             f"{RESULTS.relative_to(Path(__file__).parent.parent)} to regenerate the committed results)")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else MODELS)
    meshes = args.meshes.split(",") if args.meshes else (QUICK_MESHES if args.quick else list(MESHES))
    hardware = args.hardware.split(",") if args.hardware else HARDWARE
    for m in meshes:
        if m not in MESHES:
            parser.error(f"--meshes: unknown mesh {m!r}; known: {', '.join(MESHES)}")
    start = time.perf_counter()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meshjax-fidelity-"))
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []
    for name in names:  # results are written after each model, so a long run leaves what it did
        more, more_skipped = run_grid([name], meshes, hardware, log=lambda s: print(s, flush=True))
        rows += more
        skipped += more_skipped
        doc = {
            "quick": args.quick, "machine": machine(), "models": names[: names.index(name) + 1], "meshes": meshes,
            "hardware": hardware, "comm_band": list(COMM_BAND), "memory_band": list(MEMORY_BAND),
            "summary": summary(rows), "rows": [r.__dict__ for r in rows], "skipped": skipped,
            "wall_s": time.perf_counter() - start,
        }
        write(doc, out)
    print(summary_line(doc["summary"]))
    print(f"wrote {out}/{_stem(doc)}.json, .md and .png in {doc['wall_s']:.0f} s")
    return 0


def _stem(doc: dict) -> str:
    return "fidelity_quick" if doc["quick"] else "fidelity"


def write(doc: dict, out: Path) -> None:
    """The JSON, markdown table and scatter plot of ``doc`` into folder ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(doc)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(doc))
    plot(doc, out / f"{stem}.png")


if __name__ == "__main__":
    raise SystemExit(main())
