"""The solver's plan against hand-written strategies, on every 8-device mesh, compiled and run.

For each model x mesh (``8`` as data, ``8`` as model, ``4x2``, ``2x4``) x strategy (the solver's
plan and each baseline of :mod:`meshjax.baselines`), the whole training step (loss, gradients and
the Adam update), compiled as :func:`meshjax.verify.verify` compiles it (every tensor and every
op's operands pinned as the plan, or the baseline priced as a plan, has them):

- predicted step time under every hardware profile (the solver row is the plan solved for that
  profile; baselines are priced with the same cost model), predicted memory per device;
- compiled comm bytes per collective kind and compiled memory per device (XLA's
  ``memory_analysis``: arguments + outputs + temporaries - aliased), both as ratios to the
  cpu-sim prediction, compile time;
- measured step time on the simulated CPU devices (median of ``--repeats`` runs after a
  warm-up, concrete params), solve time.

The solver row that is compiled and run is the plan solved for ``cpu-sim``; a baseline row, the
baseline priced on ``cpu-sim`` (``xla-prop`` pins only its params and inputs). Rows where the
solver's plan is worse than the best baseline that fits (predicted time under the profile it was
solved for, or compiled comm bytes against that same baseline) are flagged.

    $ python benchmarks/compare_meshes.py --quick --out /tmp/cmp   # mlp-small, gpt-tiny: minutes on 2 cores
    $ python benchmarks/compare_meshes.py --out benchmarks/results   # + gpt-small, llama-tiny, moe-tiny

Writes ``compare_meshes{,_quick}.{json,md}`` and ``compare_*.png`` into ``--out`` (default: a new
temporary folder). The committed results in ``benchmarks/results`` change only when it is named.
    $ python benchmarks/compare_meshes.py --stage --out benchmarks/results   # 3-D: data x model x stage

With ``--stage``, only ``compare_meshes_stage.{json,md}``: every ``data x model x stage`` mesh of
8 devices with the solver's pipelined plan (micro-batches, remat and in-stage layouts chosen per
profile), beside the 2-D plan on 4x2, compiled and measured.
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
from pathlib import Path

import meshjax.devices

meshjax.devices.use_cpu_devices(8)

import jax  # noqa: E402
import optax  # noqa: E402

import meshjax as mj  # noqa: E402
from meshjax import models  # noqa: E402
from meshjax.baselines import BASELINES, applies, predict  # noqa: E402
from meshjax.commands.compare import mesh_label  # noqa: E402
from meshjax.cost.hardware import PROFILES  # noqa: E402
from meshjax.commands.compare import mesh_shapes  # noqa: E402
from meshjax.devices import make_mesh  # noqa: E402
from meshjax.errors import InfeasibleError  # noqa: E402
from meshjax.hlo import inspect_compiled  # noqa: E402
from meshjax.lower import Program  # noqa: E402
from meshjax.train import make_train_step  # noqa: E402
from meshjax.verify import Verification, compile_plan, platform_of  # noqa: E402
from meshjax.plan import solve  # noqa: E402
from meshjax.solver.problem import build_problem  # noqa: E402

RESULTS = Path(__file__).parent / "results"  # the committed results: written only with --out naming it
MESHES = mesh_shapes(8)
QUICK_MODELS = ["mlp-small", "gpt-tiny"]
FULL_MODELS = ["mlp-small", "gpt-tiny", "gpt-small", "llama-tiny", "moe-tiny"]
HARDWARE = list(PROFILES)
REL_TOL = 1e-6


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "devices": f"{jax.device_count()} simulated {jax.devices()[0].platform.upper()} devices",
    }


def run_plan(ex, plan, mesh_shape, pinned, repeats: int) -> dict:
    """Compile ``plan``'s training step as ``verify`` does (Adam, every tensor and operand pinned;
    ``pinned``: only these layouts, the rest left to XLA), read the HLO, time ``repeats`` steps."""
    mesh = make_mesh(mesh_shape)
    start = time.perf_counter()
    compiled = compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch, pinned=pinned)
    compile_s = time.perf_counter() - start
    check = Verification(plan, inspect_compiled(compiled, mesh), platform_of(mesh))
    program = Program(ex.loss, plan.graph, mesh, pinned) if pinned is not None else None
    trainer = make_train_step(plan, ex.loss, mesh, optax.adam(1e-3), program=program)
    state = trainer.init(ex.params)
    state, loss = trainer.step(state, *ex.batch)  # warm-up (compiles the same step)
    jax.block_until_ready(loss)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, loss = trainer.step(state, *ex.batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    report = check.compiled
    return {
        "compile_s": compile_s,
        "comm_bytes": report.comm_bytes,
        "collectives": report.by_kind(),
        "memory_bytes": report.memory.get("peak_bytes"),
        "comm_ratio": check.comm_ratio,
        "memory_ratio": check.memory_ratio,
        "measured_step_s": statistics.median(times),
        "measured_steps": len(times),
    }


def bench_model(name: str, repeats: int, log) -> list[dict]:
    ex = models.example(name)  # concrete: it runs
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    rows = []
    for mesh_shape in MESHES:
        label = mesh_label(mesh_shape)
        solved = {}
        for hw in HARDWARE:
            solved[hw] = solve(graph, mesh_shape, hardware=hw, train=True)  # records its solve time
        problems = {hw: build_problem(graph, mesh_shape, PROFILES[hw], train=True) for hw in HARDWARE}
        strategies = {"solver": (solved["cpu-sim"].layouts, [], False)}
        for bname, fn in BASELINES.items():
            if not applies(bname, graph):
                continue
            base = fn(graph, mesh_shape)
            strategies[bname] = (base.layouts, list(base.notes), base.partial)
        compiled_cache: dict[tuple, tuple[str, dict]] = {}
        for sname, (layouts, notes, partial) in strategies.items():
            row = {"model": name, "mesh": mesh_shape, "mesh_label": label, "strategy": sname, "notes": notes}
            predicted = {}
            cpu_plan = None
            for hw in HARDWARE:
                if sname == "solver":
                    plan = solved[hw]
                    extra = []
                else:
                    plan, extra = predict(graph, mesh_shape, layouts, hw, True, problem=problems[hw])
                    if hw == "cpu-sim":
                        notes.extend(extra)
                if hw == "cpu-sim":
                    cpu_plan = plan
                predicted[hw] = {
                    "step_time_s": plan.step_time_s,
                    "comm_bytes": plan.comm_bytes,
                    "memory_bytes": plan.peak_memory_bytes,
                    "fits": plan.peak_memory_bytes <= PROFILES[hw].memory_bytes,
                }
            if sname == "solver":
                row["solve_time_s"] = {hw: p.solve_time_s for hw, p in solved.items()}
                row["solver_layouts_differ_by_hardware"] = sorted(
                    hw for hw, p in solved.items() if p.layouts != solved["cpu-sim"].layouts
                )
            if partial:
                notes.insert(0, "activations left to XLA propagation (predicted: the solver's completion)")
            row["predicted"] = predicted
            # The cpu-sim plan (the solver's, or the baseline priced on cpu-sim) is what is compiled.
            key = (partial, tuple(sorted((n, str(l)) for n, l in layouts.items())),
                   () if partial else tuple(sorted((op, tuple(map(str, ls))) for op, ls in cpu_plan.operand_layouts.items())))
            if key in compiled_cache:
                same, result = compiled_cache[key]
                notes.append(f"same layout as {same}")
            else:
                result = run_plan(ex, cpu_plan, mesh_shape, layouts if partial else None, repeats)
                compiled_cache[key] = (sname, result)
            row["compiled"] = result
            rows.append(row)
            log(f"{name:10s} {label:10s} {sname:9s} pred(cpu-sim) {predicted['cpu-sim']['step_time_s'] * 1e3:8.4f} ms "
                f"comm {result['comm_bytes']:>9,} B  measured {result['measured_step_s'] * 1e3:7.2f} ms "
                f"compile {result['compile_s']:.1f} s")
    return rows


STAGE_MODELS = {"gpt-tiny": {"layers": 4, "scan_layers": True}}


def bench_stage(name: str, overrides: dict, repeats: int, log) -> list[dict]:
    """The 3-D section: the solver's pipelined plan on every ``data x model x stage`` mesh."""
    from meshjax.commands.compare import stage_meshes
    from meshjax.pipeline.plan import solve_pipelined
    from meshjax.pipeline.stage_graph import preset_tracer

    ex = models.example(name, **overrides)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    trace_for = preset_tracer(name, **overrides)
    layers = ex.config.layers
    rows = []
    for mesh_shape in [{"data": 4, "model": 2}, *stage_meshes(8)]:
        if mesh_shape.get("stage", 1) > layers or layers % mesh_shape.get("stage", 1):
            continue
        label = mesh_label(mesh_shape)
        predicted, plans = {}, {}
        for hw in HARDWARE:
            start = time.perf_counter()
            if "stage" in mesh_shape:
                plan = solve_pipelined(trace_for, mesh_shape, hardware=hw, train=True)
            else:
                plan = solve(graph, mesh_shape, hardware=hw, train=True)
            plans[hw] = (plan, time.perf_counter() - start)
            predicted[hw] = {"step_time_s": plan.step_time_s, "comm_bytes": plan.comm_bytes,
                             "memory_bytes": plan.peak_memory_bytes}
            if hasattr(plan, "pipeline"):
                predicted[hw]["pipeline"] = plan.pipeline.to_json()
        plan = plans["cpu-sim"][0]
        mesh = make_mesh(mesh_shape)
        program = plan.program(ex.loss, mesh)
        jitted = program.jit(grad=True)
        start = time.perf_counter()
        compiled = jitted.lower(ex.params, *ex.batch).compile()
        compile_s = time.perf_counter() - start
        report = inspect_compiled(compiled, mesh)
        params, batch = program.place(ex.params, *ex.batch)
        pv, av = jitted.arguments(params, batch)
        jax.block_until_ready(compiled(pv, av))
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(compiled(pv, av))
            times.append(time.perf_counter() - t)
        row = {"model": name, "mesh": mesh_shape, "mesh_label": label,
               "strategy": "solver (pipelined)" if "stage" in mesh_shape else "solver",
               "predicted": predicted, "solve_time_s": {hw: s for hw, (_, s) in plans.items()},
               "compiled": {"compile_s": compile_s, "comm_bytes": report.comm_bytes, "collectives": report.by_kind(),
                            "measured_step_s": statistics.median(times)}}
        rows.append(row)
        log(f"{name:10s} {label:26s} pred(cpu-sim) {predicted['cpu-sim']['step_time_s'] * 1e3:8.4f} ms "
            f"comm pred {predicted['cpu-sim']['comm_bytes']:>9,.0f} compiled {report.comm_bytes:>9,} B "
            f"measured {row['compiled']['measured_step_s'] * 1e3:7.2f} ms")
    return rows


def stage_markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# 3-D meshes: data x model x stage (pipelined) on 8 devices",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, JAX {m['jax']}, {m['devices']}. Loss + grads of "
        "gpt-tiny with 4 scanned layers; the solver's pipelined plan per mesh (micro-batches m, stage remat and "
        f"in-stage layouts chosen per profile), beside the 2-D plan on 4x2. Measured: median of {doc['repeats']} CPU steps.",
        "",
        "| mesh | strategy | pipeline (cpu-sim) | " + " | ".join(f"pred. {hw} ms" for hw in HARDWARE)
        + " | pred. comm B | compiled comm B | measured CPU ms |",
        "|" + "---|" * (6 + len(HARDWARE)),
    ]
    for r in doc["rows"]:
        pipe = r["predicted"]["cpu-sim"].get("pipeline")
        pipe_s = f"p={pipe['stages']}, m={pipe['microbatches']}{', remat' if pipe['remat'] else ''}" if pipe else "-"
        preds = " | ".join(f"{r['predicted'][hw]['step_time_s'] * 1e3:.4f}" for hw in HARDWARE)
        c = r["compiled"]
        lines.append(f"| {r['mesh_label']} | {r['strategy']} | {pipe_s} | {preds} | "
                     f"{r['predicted']['cpu-sim']['comm_bytes']:,.0f} | {c['comm_bytes']:,} | {c['measured_step_s'] * 1e3:.2f} |")
    return "\n".join(lines) + "\n"


def flag(rows: list[dict]) -> list[dict]:
    """Per (model, mesh, hardware): the solver against the best baseline that fits."""
    flags = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mesh_label"]), []).append(r)
    for (model, mesh), group in groups.items():
        solver = next(r for r in group if r["strategy"] == "solver")
        bases = [r for r in group if r["strategy"] != "solver"]
        for hw in HARDWARE:
            fitting = [r for r in bases if r["predicted"][hw]["fits"]]
            if not fitting:
                continue
            best = min(fitting, key=lambda r: r["predicted"][hw]["step_time_s"])
            s_time, b_time = solver["predicted"][hw]["step_time_s"], best["predicted"][hw]["step_time_s"]
            entry = {"model": model, "mesh": mesh, "hardware": hw, "best_baseline": best["strategy"],
                     "solver_step_s": s_time, "baseline_step_s": b_time}
            if s_time > b_time * (1 + REL_TOL):
                flags.append({**entry, "what": "predicted step time"})
            if hw == "cpu-sim":
                s_comm, b_comm = solver["compiled"]["comm_bytes"], best["compiled"]["comm_bytes"]
                if s_comm > b_comm:
                    flags.append({**entry, "what": "compiled comm bytes", "solver_comm_bytes": s_comm,
                                  "baseline_comm_bytes": b_comm})
    return flags


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        f"# Solver vs hand-written strategies on 8 devices{' (quick)' if doc['quick'] else ''}",
        "",
        f"Machine: {m['platform']}, {m['cores']} cores, Python {m['python']}, JAX {m['jax']}, {m['devices']}.",
        f"Whole training step (loss, gradients, Adam update), compiled with every tensor and operand pinned. Measured: median of {doc['repeats']} CPU steps after a warm-up. "
        "Predicted times per hardware profile in ms; the solver row's plan is solved for each profile "
        "(compiled/measured: the cpu-sim plan). Memory: compiled bytes per device (args + outputs + temps - aliased). "
        "**bold**: fastest predicted on its mesh under h100-node.",
        "",
        "| model | mesh | strategy | " + " | ".join(f"pred. {hw} ms" for hw in HARDWARE)
        + " | compiled comm B | collectives | compiled mem/dev KiB | measured CPU ms | solve s | compile s |",
        "|" + "---|" * (3 + len(HARDWARE) + 6),
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["model"], r["mesh_label"]), []).append(r)
    for (model, mesh), group in groups.items():
        best = min(r["predicted"]["h100-node"]["step_time_s"] for r in group)
        for r in group:
            c = r["compiled"]
            colls = ", ".join(f"{k} {v['count']}x/{v['bytes']:,}B" for k, v in sorted(c["collectives"].items()))
            preds = []
            for hw in HARDWARE:
                t = r["predicted"][hw]["step_time_s"] * 1e3
                s = f"{t:.4f}"
                if hw == "h100-node" and r["predicted"][hw]["step_time_s"] <= best * (1 + REL_TOL):
                    s = f"**{s}**"
                preds.append(s)
            solve_s = f"{r['solve_time_s']['cpu-sim']:.2f}" if "solve_time_s" in r else ""
            mem = f"{c['memory_bytes'] / 1024:,.0f}" if c["memory_bytes"] is not None else "n/a"
            lines.append(
                f"| {model} | {mesh} | {r['strategy']} | " + " | ".join(preds)
                + f" | {c['comm_bytes']:,} | {colls or '-'} | {mem} | {c['measured_step_s'] * 1e3:.2f} | {solve_s} | {c['compile_s']:.1f} |"
            )
    lines += ["", "## Where the solver's plan is not the best", ""]
    if not doc["flags"]:
        lines.append("Nowhere: on every model, mesh and profile the solver's plan is at least as fast (predicted) "
                     "as the best baseline that fits, and moves no more compiled bytes than it.")
    for f in doc["flags"]:
        if f["what"] == "predicted step time":
            lines.append(f"- {f['model']} on {f['mesh']} ({f['hardware']}): predicted {f['solver_step_s'] * 1e3:.4f} ms "
                         f"vs {f['best_baseline']} {f['baseline_step_s'] * 1e3:.4f} ms")
        else:
            lines.append(f"- {f['model']} on {f['mesh']}: compiled comm {f['solver_comm_bytes']:,} B vs "
                         f"{f['best_baseline']} (fastest baseline on cpu-sim) {f['baseline_comm_bytes']:,} B")
    notes = sorted({(r["strategy"], n) for r in doc["rows"] for n in r["notes"] if not n.startswith("same layout")})
    if notes:
        lines += ["", "## Baseline notes", ""] + [f"- {s}: {n}" for s, n in notes]
    return "\n".join(lines) + "\n"


def plots(doc: dict, stem: str, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = []
    models_ = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    strategies = list(dict.fromkeys(r["strategy"] for r in doc["rows"]))
    meshes = list(dict.fromkeys(r["mesh_label"] for r in doc["rows"]))
    for metric, title, get in (
        ("comm", "compiled comm bytes per step (KiB)", lambda r: r["compiled"]["comm_bytes"] / 1024),
        ("predicted", "predicted step time on h100-node (us)", lambda r: r["predicted"]["h100-node"]["step_time_s"] * 1e6),
        ("measured", "measured CPU step time (ms)", lambda r: r["compiled"]["measured_step_s"] * 1e3),
    ):
        fig, axes = plt.subplots(1, len(models_), figsize=(4.5 * len(models_), 3.6), squeeze=False)
        for ax, model in zip(axes[0], models_):
            x = np.arange(len(meshes))
            width = 0.8 / len(strategies)
            for i, s in enumerate(strategies):
                vals = []
                for mesh in meshes:
                    r = next((r for r in doc["rows"] if r["model"] == model and r["mesh_label"] == mesh and r["strategy"] == s), None)
                    vals.append(get(r) if r else 0)
                ax.bar(x + i * width, vals, width, label=s)
            ax.set_xticks(x + 0.4 - width / 2, meshes, fontsize=8)
            ax.set_title(model, fontsize=10)
        axes[0][0].set_ylabel(title, fontsize=9)
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{stem}_{metric}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        out.append(str(path))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"models {', '.join(QUICK_MODELS)}; 5 measured steps")
    parser.add_argument("--models", default=None, help="comma-separated presets (default: per --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps per layout (>= 5)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"folder for the JSON, markdown and plots (default: a new temporary folder; "
                             f"{RESULTS.relative_to(Path(__file__).parent.parent)} to regenerate the committed results)")
    parser.add_argument("--stage", action="store_true", help="only the 3-D section (data x model x stage)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meshjax-compare-"))
    if args.stage:
        repeats = max(5, args.repeats or 5)
        rows = []
        for name, overrides in STAGE_MODELS.items():
            rows += bench_stage(name, overrides, repeats, lambda s: print(s, flush=True))
        doc = {"machine": machine(), "repeats": repeats, "hardware": HARDWARE, "rows": rows}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare_meshes_stage.json").write_text(json.dumps(doc, indent=1))
        (out_dir / "compare_meshes_stage.md").write_text(stage_markdown(doc))
        print(f"wrote {out_dir / 'compare_meshes_stage'}.json and .md")
        return 0
    names = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    repeats = max(5, args.repeats or (5 if args.quick else 20))
    start = time.perf_counter()
    rows, skipped = [], []
    for name in names:
        if name not in models.PRESETS:
            print(f"skipping {name}: not a preset of this meshjax", flush=True)
            skipped.append(name)
            continue
        try:
            rows += bench_model(name, repeats, lambda s: print(s, flush=True))
        except InfeasibleError as err:
            print(f"skipping {name}: {err}", flush=True)
            skipped.append(name)
    doc = {"quick": args.quick, "machine": machine(), "repeats": repeats, "hardware": HARDWARE,
           "models": [n for n in names if n not in skipped], "skipped": skipped, "rows": rows}
    doc["flags"] = flag(rows)
    doc["wall_s"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "compare_meshes_quick" if args.quick else "compare_meshes"
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown(doc))
    pngs = plots(doc, stem, out_dir)
    print(f"wrote {out_dir / stem}.json, .md and {len(pngs)} plots in {doc['wall_s']:.0f} s; {len(doc['flags'])} flags")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
