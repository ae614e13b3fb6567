"""How long the layout solver takes on paper-size models.

Cases:

- ``gpt3-175b``: GPT-3 175B (96 layers, scanned), 64 devices as an 8x8 (data, model) mesh on the
  ``h100-2node`` profile (8-GPU NVLink nodes joined by InfiniBand), training, 80 GB per device;
  bfloat16 at batch 4 (the largest power of two that fits) and batch 6 (tighter still).
- ``gpt3-1.3b``: GPT-3 1.3B, 24 *unrolled* layers, 8 devices as 4x2 on ``h100-node``, training
  (no budget).

Each case is also solved once with a time limit that fits the target: HiGHS returns its best
layout so far and the gap it could prove, and the table gives that layout's step time over the
optimum's.

For each: trace time, problem-build time, ILP time and total ``solve`` time (median of 3 runs),
problem size (nodes, edges, ILP variables and rows) and the plan's predicted step time and memory.
Targets: 175B solves in under 1 s, 1.3B unrolled in under 2 s.

Run::

    python benchmarks/solver_scaling.py --out /tmp/scaling       # solver_scaling.{json,md} there
    python benchmarks/solver_scaling.py --out benchmarks/results  # regenerate the committed results

Without ``--out`` the files go to a new temporary folder.

Nothing is allocated: params and batches are ``jax.ShapeDtypeStruct``.
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

import jax
import numpy as np
import scipy
from rich.console import Console
from rich.table import Table

import meshjax as mj
from meshjax import models
from meshjax.cost.hardware import get_hardware
from meshjax.plan import solve
from meshjax.solver.ilp import solve_ilp
from meshjax.solver.problem import Constraints, build_problem

REPEATS = 3

CASES = [
    # Training memory keeps what the backward pass reads (no rematerialisation beyond redoing the
    # reshards a backward reads) and mixed-precision Adam state (fp32 master weights and moments:
    # 16 bytes per param, 43.75 GB per device of 64 for 175B), so at 80 GB per device the paper's
    # batch of 1536 sequences is out of reach. In bfloat16 the least memory any layout needs is
    # 54.2 GB at batch 2, 64.6 GB at batch 4, 74.9 GB at batch 6 and 85.2 GB at batch 8: batch 4
    # is the largest power of two that fits, and the budget binds there. Batch 6 leaves the
    # solver the least room.
    {
        "name": "gpt3-175b bf16 batch 4 (scanned)",
        "preset": "gpt3-175b",
        "overrides": {"scan_layers": True, "batch": 4, "dtype": "bfloat16"},
        "mesh": {"data": 8, "model": 8},
        "hardware": "h100-2node",
        "memory_budget": 80e9,
        "target_s": 1.0,
    },
    {
        "name": "gpt3-175b bf16 batch 6 (scanned)",
        "preset": "gpt3-175b",
        "overrides": {"scan_layers": True, "batch": 6, "dtype": "bfloat16"},
        "mesh": {"data": 8, "model": 8},
        "hardware": "h100-2node",
        "memory_budget": 80e9,
        "target_s": 1.0,
    },
    {
        "name": "gpt3-1.3b (24 unrolled layers)",
        "preset": "gpt3-1.3b",
        "overrides": {"scan_layers": False, "layers": 24},
        "mesh": {"data": 4, "model": 2},
        "hardware": "h100-node",
        "memory_budget": None,
        "target_s": 2.0,
    },
]


def ilp_size(problem) -> tuple[int, int]:
    """Variables and constraint rows of the ILP ``solve_ilp`` builds (mirrors its construction)."""
    n_x = sum(len(n.options) for n in problem.nodes)
    n_y = sum(e.cost.size for e in problem.edges)
    has_peak = any(n.peak.any() for n in problem.nodes)
    rows = len(problem.nodes) + sum(sum(e.cost.shape) for e in problem.edges)
    rows += sum(1 for n in problem.nodes if n.peak.any()) if has_peak else 0
    return n_x + n_y + int(has_peak), rows


def run_case(case: dict) -> dict:
    ex = models.example(case["preset"], abstract=True, **case["overrides"])
    hw = get_hardware(case["hardware"])
    trace_s, build_s, ilp_s, solve_s = [], [], [], []
    plan = None
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        graph = mj.trace(ex.loss, ex.params, *ex.batch)
        trace_s.append(time.perf_counter() - t0)

        # The two phases of solve(), timed separately ...
        t0 = time.perf_counter()
        problem = build_problem(graph, case["mesh"], hw, train=True, constraints=Constraints.make(graph, case["mesh"]))
        build_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        solve_ilp(problem, memory_budget=case["memory_budget"])
        ilp_s.append(time.perf_counter() - t0)

        # ... and solve() end to end (what a user waits for after tracing).
        t0 = time.perf_counter()
        plan = solve(graph, case["mesh"], hardware=hw, train=True, memory_budget=case["memory_budget"])
        solve_s.append(time.perf_counter() - t0)

    n_vars, n_rows = ilp_size(plan.problem)
    mem = plan.memory_breakdown()
    total = statistics.median(solve_s)

    # Within the target: solve() with a time limit returns HiGHS's best layout and its gap.
    limit = max(0.05, case["target_s"] - statistics.median(build_s) - 0.05)
    t0 = time.perf_counter()
    limited = solve(graph, case["mesh"], hardware=hw, train=True, memory_budget=case["memory_budget"], time_limit=limit)
    limited_s = time.perf_counter() - t0
    return {
        "case": case["name"],
        "preset": case["preset"],
        "overrides": case["overrides"],
        "mesh": case["mesh"],
        "hardware": case["hardware"],
        "train": True,
        "memory_budget_bytes": case["memory_budget"],
        "graph": {"tensors": len(graph.tensors), "ops": len(graph.ops),
                  "blocks": {k: {"kind": b.kind, "trip_count": b.trip_count} for k, b in graph.blocks.items()}},
        "problem": {"nodes": len(plan.problem.nodes), "edges": len(plan.problem.edges),
                    "options": sum(len(n.options) for n in plan.problem.nodes),
                    "ilp_variables": n_vars, "ilp_rows": n_rows},
        "seconds": {
            "trace": statistics.median(trace_s),
            "build_problem": statistics.median(build_s),
            "ilp": statistics.median(ilp_s),
            "solve_total": total,
            "runs": {"trace": trace_s, "build_problem": build_s, "ilp": ilp_s, "solve_total": solve_s},
        },
        "target_s": case["target_s"],
        "meets_target": total < case["target_s"],
        "solver_status": plan.solution.status,
        "time_limited": {
            "time_limit_s": limit,
            "solve_total_s": limited_s,
            "status": limited.solution.status,
            "reported_gap": limited.solution.gap,
            "step_time_vs_optimum": limited.solution.objective / plan.solution.objective,
        },
        "predicted": {
            "step_time_s": plan.step_time_s,
            "comm_time_s": plan.comm_time_s,
            "compute_time_s": plan.compute_time_s,
            "comm_bytes": plan.comm_bytes,
            "memory_bytes": mem["total"],
            "memory": mem,
        },
        "rules": {d: list(a) for d, a in plan.rules.items()} if plan.rules is not None else None,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
    }


def markdown(results: list[dict], info: dict) -> str:
    lines = [
        "# Solver scaling",
        "",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs, Python {info['python']}, "
        f"JAX {info['jax']}, SciPy {info['scipy']} (HiGHS via `scipy.optimize.milp`). Median of {REPEATS} runs.",
        "Produced by `python benchmarks/solver_scaling.py`.",
        "",
        "| case | mesh | hardware | tensors / ops | nodes / edges | ILP vars / rows | trace s | build s | ILP s | solve s | target | step ms | comm GB | memory GB/device | time-limited solve s | its step time / optimum | reported gap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, p, g, pr = r["seconds"], r["problem"], r["graph"], r["predicted"]
        mesh = "x".join(str(v) for v in r["mesh"].values()) + f" ({','.join(r['mesh'])})"
        ok = "met" if r["meets_target"] else "**missed**"
        lines.append(
            f"| {r['case']} | {mesh} | {r['hardware']} | {g['tensors']} / {g['ops']} | {p['nodes']} / {p['edges']} | "
            f"{p['ilp_variables']} / {p['ilp_rows']} | {s['trace']:.3f} | {s['build_problem']:.3f} | {s['ilp']:.3f} | "
            f"{s['solve_total']:.3f} | < {r['target_s']:g} s {ok} | {pr['step_time_s'] * 1e3:.1f} | "
            f"{pr['comm_bytes'] / 1e9:.2f} | {pr['memory_bytes'] / 1e9:.2f} | "
            f"{r['time_limited']['solve_total_s']:.3f} | {r['time_limited']['step_time_vs_optimum']:.4f} | "
            f"{r['time_limited']['reported_gap']:.2%} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for solver_scaling.{json,md} (default: a new temporary folder; "
                             "benchmarks/results to regenerate the committed results)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meshjax-scaling-"))
    console = Console()
    info = machine()
    results = []
    for case in CASES:
        console.print(f"[bold]{case['name']}[/bold] ...")
        results.append(run_case(case))
    table = Table(title=f"solver scaling (median of {REPEATS})")
    for col in ("case", "mesh", "nodes", "ILP vars", "trace s", "build s", "ILP s", "solve s", "target", "step ms", "GB/device"):
        table.add_column(col)
    for r in results:
        s = r["seconds"]
        table.add_row(
            r["case"], "x".join(map(str, r["mesh"].values())), str(r["problem"]["nodes"]), str(r["problem"]["ilp_variables"]),
            f"{s['trace']:.3f}", f"{s['build_problem']:.3f}", f"{s['ilp']:.3f}", f"{s['solve_total']:.3f}",
            f"< {r['target_s']:g} s " + ("ok" if r["meets_target"] else "MISSED"),
            f"{r['predicted']['step_time_s'] * 1e3:.1f}", f"{r['predicted']['memory_bytes'] / 1e9:.2f}",
        )
    console.print(table)
    console.print(info)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "solver_scaling.json").write_text(json.dumps({"machine": info, "repeats": REPEATS, "results": results}, indent=2) + "\n")
    (out_dir / "solver_scaling.md").write_text(markdown(results, info))
    console.print(f"wrote {out_dir / 'solver_scaling.json'} and {out_dir / 'solver_scaling.md'}")


if __name__ == "__main__":
    main()
