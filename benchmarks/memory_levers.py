"""What each memory lever buys: the largest global batch that fits, and its predicted step time
and MFU, for paper-size models; compiled against predicted memory on simulated CPU devices.

Lever sets: ``none`` (no recompute, one micro-batch), ``+selective`` and ``+full`` (that
recompute in every scanned block, one micro-batch), ``+accumulation`` (no recompute, the
solver's micro-batch count) and ``solver`` (both chosen by the solver). Paper-size models are
planned abstractly (bf16 params; Adam with an fp32 master copy and fp32 moments, the
default optimizer; 80 GB per device); the largest batch is searched over powers of two up to the paper batch.

On 8 simulated CPU devices, ``gpt-small`` (scanned) under half the least memory it needs with no
levers: each lever set's plan (or why none fits), predicted and compiled memory.

    $ python benchmarks/memory_levers.py            # minutes on 2 cores
    $ python benchmarks/memory_levers.py --quick    # GPT-3 175B and gpt-small only

Writes ``benchmarks/results/memory_levers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import meshjax.devices

meshjax.devices.use_cpu_devices(8)

import meshjax as mj  # noqa: E402
from meshjax import models  # noqa: E402
from meshjax.cost.hardware import get_hardware  # noqa: E402
from meshjax.errors import InfeasibleError  # noqa: E402
from meshjax.hlo import inspect_compiled  # noqa: E402
from meshjax.solve import solve  # noqa: E402
from meshjax.solver.ilp import solve_ilp  # noqa: E402
from meshjax.solver.problem import build_problem  # noqa: E402
from meshjax.verify import compile_plan  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEVERS = {
    "none": {"remat": "none", "microbatches": 1},
    "+selective": {"remat": "selective", "microbatches": 1},
    "+full": {"remat": "full", "microbatches": 1},
    "+accumulation": {"remat": "none", "microbatches": "auto"},
    "solver": {"remat": "auto", "microbatches": "auto"},
}
BIG = [
    # model, overrides, mesh, hardware, paper batch
    ("gpt3-175b", {"seq": 2048}, {"data": 8, "model": 8}, "h100-2node", 1536),
    ("llama-70b", {"seq": 4096}, {"data": 8, "model": 8}, "h100-2node", 256),
]
BUDGET = 80e9


def _plan(name, overrides, mesh, hardware, batch, levers):
    ex = models.example(name, abstract=True, batch=batch, dtype="bfloat16", scan_layers=True, **overrides)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    plan = solve(graph, mesh, hardware=hardware, train=True, memory_budget=BUDGET, **levers)
    return plan


def _mfu(plan, name, overrides, batch, hardware):
    module, config = models.get(name, batch=batch, dtype="bfloat16", scan_layers=True, **overrides)
    params = module.param_count(config)
    tokens = batch * config.seq
    devices = 1
    for n in plan.mesh_shape.values():
        devices *= n
    peak = get_hardware(hardware).peak_flops("bfloat16")
    return 6 * params * tokens / (plan.step_time_s * devices * peak)


def largest_batch(name, overrides, mesh, hardware, paper, levers):
    """The largest power of two up to ``paper`` (or ``paper`` itself) that fits, with its plan:
    a binary search, as memory grows with the batch for fixed levers."""
    sizes = sorted({2**i for i in range(0, paper.bit_length()) if 2**i <= paper} | {paper})
    best, lo, hi = None, 0, len(sizes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        batch = sizes[mid]
        start = time.perf_counter()
        try:
            plan = _plan(name, overrides, mesh, hardware, batch, levers)
        except InfeasibleError:
            hi = mid - 1
            continue
        lo = mid + 1
        best = {
            "batch": batch, "step_time_s": plan.step_time_s, "peak_memory_gb": plan.peak_memory_bytes / 1e9,
            "microbatches": plan.microbatches, "remat": dict(plan.remat),
            "mfu": _mfu(plan, name, overrides, batch, hardware), "solve_s": time.perf_counter() - start,
        }
    return best


def small(quick: bool):
    """gpt-small on 8 simulated CPU devices under half its least no-lever memory."""
    mesh_shape = {"data": 4, "model": 2}
    ex = models.example("gpt-small", key=0, scan_layers=True)
    graph = mj.trace(ex.loss, ex.params, *ex.batch)
    least = solve_ilp(build_problem(graph, mesh_shape, get_hardware("cpu-sim"), train=True), objective="memory").memory
    budget = least / 2
    mesh = meshjax.devices.make_mesh(mesh_shape)
    rows = []
    for label, levers in LEVERS.items():
        try:
            plan = solve(graph, mesh_shape, hardware="cpu-sim", train=True, memory_budget=budget, **levers)
        except InfeasibleError as err:
            rows.append({"levers": label, "fits": False, "why": str(err)[:120]})
            continue
        compiled = inspect_compiled(compile_plan(plan, ex.loss, mesh, ex.params, *ex.batch), mesh).memory["peak_bytes"]
        rows.append({
            "levers": label, "fits": True, "remat": dict(plan.remat), "microbatches": plan.microbatches,
            "step_time_ms": plan.step_time_s * 1e3, "predicted_bytes": plan.peak_memory_bytes,
            "compiled_bytes": compiled, "ratio": compiled / plan.peak_memory_bytes,
        })
    return {"least_no_levers_bytes": least, "budget_bytes": budget, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = {"budget_bytes": BUDGET, "optimizer": "adam (fp32 master and moments)", "big": [], "gpt_small": None}
    for name, overrides, mesh, hardware, paper in BIG[:1] if args.quick else BIG:
        for label, levers in LEVERS.items():
            row = largest_batch(name, overrides, mesh, hardware, paper, levers)
            out["big"].append({"model": name, "levers": label, "mesh": mesh, **(row or {"batch": 0})})
            print(out["big"][-1], flush=True)
    out["gpt_small"] = small(args.quick)
    print(out["gpt_small"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"memory_levers{suffix}.json").write_text(json.dumps(out, indent=2))
    lines = ["| model | levers | largest batch | micro-batches | remat | step (s) | MFU | memory (GB) |", "|---|---|---|---|---|---|---|---|"]
    for r in out["big"]:
        if not r.get("batch"):
            lines.append(f"| {r['model']} | {r['levers']} | none fits | | | | | |")
            continue
        remat = ", ".join(f"{b}: {p}" for b, p in r["remat"].items()) or "none"
        lines.append(f"| {r['model']} | {r['levers']} | {r['batch']} | {r['microbatches']} | {remat} | "
                     f"{r['step_time_s']:.2f} | {r['mfu']:.1%} | {r['peak_memory_gb']:.1f} |")
    small_out = out["gpt_small"]
    lines += ["", f"gpt-small (scanned) on 4x2 simulated CPU devices, budget {small_out['budget_bytes']:,.0f} B "
              f"(half of {small_out['least_no_levers_bytes']:,.0f} B):", "",
              "| levers | micro-batches | remat | predicted B | compiled B | compiled/predicted |", "|---|---|---|---|---|---|"]
    for r in small_out["rows"]:
        if not r["fits"]:
            lines.append(f"| {r['levers']} | does not fit | | | | |")
            continue
        remat = ", ".join(f"{b}: {p}" for b, p in r["remat"].items()) or "none"
        lines.append(f"| {r['levers']} | {r['microbatches']} | {remat} | {r['predicted_bytes']:,.0f} | "
                     f"{r['compiled_bytes']:,.0f} | {r['ratio']:.3f} |")
    (RESULTS / f"memory_levers{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
