"""What each memory lever buys: the largest global batch that fits, and its predicted step time
and MFU, for paper-size models; compiled against predicted memory on simulated CPU devices.

Lever sets: ``none`` (attention as einsums keeping ``[batch, heads, seq, key_seq]``, no
recompute, one micro-batch: ``--set attention=einsum``); ``+attention`` (the memory-efficient
attention op, no recompute, one micro-batch); then with the attention op: ``+selective`` and
``+full`` (that recompute in every scanned block, one micro-batch), ``+accumulation`` (no
recompute, the solver's micro-batch count) and ``solver`` (recompute and micro-batches chosen by
the solver). Paper-size models are planned abstractly (bf16 params; Adam with an fp32 master
copy and fp32 moments, the default optimizer; 80 GB per device); the largest batch is searched
over powers of two up to the paper batch: GPT-3 175B (seq 2048) and Llama-70B (seq 4096) on 8x8
``h100-2node``, the Llama-3-8B shape (seq 8192) on 8 ``h100-node`` devices.

Megatron's published configuration for GPT-3 175B on 64 GPUs (global batch 1536, micro-batch 1,
TP8 with sequence parallelism and selective recompute, PP8) priced in the same model, with the
pipeline axis replaced by data parallelism (pipelines are priced in ``pipeline_175b.py``): the
``megatron-sp`` baseline's layouts on ``data 8 x model 8``, selective recompute, 192 micro-batches
(one row per data rank), beside the solver's plan for that batch.

On 8 simulated CPU devices, ``gpt-small`` (scanned) under half the least memory it needs with no
levers: each lever set's plan (or why none fits), predicted and compiled memory.

    $ python benchmarks/memory_levers.py            # ~10 minutes on 2 shared cores
    $ python benchmarks/memory_levers.py --quick    # GPT-3 175B and gpt-small only

Writes ``benchmarks/results/memory_levers{,_quick}.{json,md,png}``.
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
    "none": {"attention": "einsum", "remat": "none", "microbatches": 1},
    "+attention": {"attention": "flash", "remat": "none", "microbatches": 1},
    "+selective": {"attention": "flash", "remat": "selective", "microbatches": 1},
    "+full": {"attention": "flash", "remat": "full", "microbatches": 1},
    "+accumulation": {"attention": "flash", "remat": "none", "microbatches": "auto"},
    "solver": {"attention": "flash", "remat": "auto", "microbatches": "auto"},
}
BIG = [
    # model, overrides, mesh, hardware, largest batch searched (the paper's where there is one)
    ("gpt3-175b", {"seq": 2048}, {"data": 8, "model": 8}, "h100-2node", 1536),
    ("llama-70b", {"seq": 4096}, {"data": 8, "model": 8}, "h100-2node", 256),
    ("llama3-8b", {"seq": 8192}, {"data": 8}, "h100-node", 256),
]
BUDGET = 80e9
MEGATRON_175B = {"batch": 1536, "mesh": {"data": 8, "model": 8}, "hardware": "h100-2node", "remat": "selective"}


def _graph(name, overrides, batch, attention):
    ex = models.example(name, abstract=True, batch=batch, dtype="bfloat16", scan_layers=True, attention=attention,
                        **overrides)
    return mj.trace(ex.loss, ex.params, *ex.batch)


def _plan(name, overrides, mesh, hardware, batch, levers):
    levers = dict(levers)
    graph = _graph(name, overrides, batch, levers.pop("attention"))
    return solve(graph, mesh, hardware=hardware, train=True, memory_budget=BUDGET, **levers)


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


def megatron_175b() -> dict:
    """Megatron's 175B configuration (TP8 + sequence parallelism + selective recompute,
    micro-batch 1 per data rank) priced by the cost model, beside the solver's plan."""
    from meshjax.baselines import megatron_sp, predict
    from meshjax.cost.remat import remat_units
    from meshjax.microbatch import split_batch

    cfg = MEGATRON_175B
    mesh, hw, batch = cfg["mesh"], get_hardware(cfg["hardware"]), cfg["batch"]
    k = batch // mesh["data"]  # one row per data rank per micro-batch
    graph = split_batch(_graph("gpt3-175b", {"seq": 2048}, batch, "flash"), k)
    remat = {unit: cfg["remat"] for unit in remat_units(graph)}
    start = time.perf_counter()
    problem = build_problem(graph, mesh, hw, train=True, remat=remat, microbatches=k)
    base = megatron_sp(graph, mesh)
    plan, notes = predict(graph, mesh, base.layouts, hw, train=True, problem=problem)
    row = {
        "config": "megatron-sp, selective, micro-batch 1 per data rank", "batch": batch, "microbatches": plan.microbatches,
        "remat": dict(plan.remat), "step_time_s": plan.step_time_s, "peak_memory_gb": plan.peak_memory_bytes / 1e9,
        "fits": plan.peak_memory_bytes <= BUDGET, "memory": {n: b / 1e9 for n, b in plan.memory_breakdown().items()},
        "mfu": _mfu(plan, "gpt3-175b", {"seq": 2048}, batch, cfg["hardware"]), "notes": base.notes + notes,
        "price_s": time.perf_counter() - start,
    }
    solver = _plan("gpt3-175b", {"seq": 2048}, mesh, cfg["hardware"], batch, LEVERS["solver"])
    return {"megatron": row, "solver": {
        "batch": batch, "microbatches": solver.microbatches, "remat": dict(solver.remat),
        "step_time_s": solver.step_time_s, "peak_memory_gb": solver.peak_memory_bytes / 1e9,
        "mfu": _mfu(solver, "gpt3-175b", {"seq": 2048}, batch, cfg["hardware"]),
    }}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in out["big"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = [r for r in out["big"] if r["model"] == name]
        labels = [r["levers"] for r in rows]
        batches = [r.get("batch", 0) for r in rows]
        bars = ax.bar(range(len(rows)), [max(b, 0.5) for b in batches], color="tab:blue")
        for bar, r in zip(bars, rows):
            text = f"{r['mfu']:.0%}" if r.get("batch") else "-"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{name}, {'x'.join(map(str, rows[0]['mesh'].values()))}", fontsize=10)
        ax.set_ylabel("largest global batch (label: MFU)")
    fig.suptitle("Memory levers: largest batch under 80 GB per device (predicted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def small(quick: bool):
    """gpt-small on 8 simulated CPU devices under half its least no-lever memory."""
    mesh_shape = {"data": 4, "model": 2}
    examples = {form: models.example("gpt-small", key=0, scan_layers=True, attention=form) for form in ("einsum", "flash")}
    graphs = {form: mj.trace(ex.loss, ex.params, *ex.batch) for form, ex in examples.items()}
    least = solve_ilp(build_problem(graphs["einsum"], mesh_shape, get_hardware("cpu-sim"), train=True),
                      objective="memory").memory
    budget = least / 2
    mesh = meshjax.devices.make_mesh(mesh_shape)
    rows = []
    for label, levers in LEVERS.items():
        levers = dict(levers)
        form = levers.pop("attention")
        ex, graph = examples[form], graphs[form]
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
    started = time.perf_counter()
    out = {"budget_bytes": BUDGET, "optimizer": "adam (fp32 master and moments)", "big": [], "gpt_small": None}
    for name, overrides, mesh, hardware, paper in BIG[:1] if args.quick else BIG:
        for label, levers in LEVERS.items():
            row = largest_batch(name, overrides, mesh, hardware, paper, levers)
            out["big"].append({"model": name, "seq": overrides["seq"], "levers": label, "mesh": mesh,
                               "hardware": hardware, **(row or {"batch": 0})})
            print(out["big"][-1], flush=True)
    out["megatron_175b"] = megatron_175b()
    print(out["megatron_175b"], flush=True)
    out["gpt_small"] = small(args.quick)
    out["wall_s"] = time.perf_counter() - started
    print(out["gpt_small"], flush=True)
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"memory_levers{suffix}.json").write_text(json.dumps(out, indent=2))
    lines = ["Largest global batch under 80 GB per device (bf16, Adam with fp32 master and moments), predicted "
             "step time and MFU (6 x params x tokens over step time x devices x peak bf16 FLOP/s).", "",
             "| model (seq), mesh | levers | largest batch | micro-batches | remat | step (s) | MFU | memory (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["big"]:
        where = f"{r['model']} ({r['seq']}), {'x'.join(map(str, r['mesh'].values()))}"
        if not r.get("batch"):
            lines.append(f"| {where} | {r['levers']} | none fits | | | | | |")
            continue
        remat = ", ".join(f"{b}: {p}" for b, p in r["remat"].items()) or "none"
        lines.append(f"| {where} | {r['levers']} | {r['batch']} | {r['microbatches']} | {remat} | "
                     f"{r['step_time_s']:.2f} | {r['mfu']:.1%} | {r['peak_memory_gb']:.1f} |")
    meg, sol = out["megatron_175b"]["megatron"], out["megatron_175b"]["solver"]
    lines += ["", "GPT-3 175B, global batch 1536, data 8 x model 8, h100-2node: Megatron's configuration "
              "(TP8 + sequence parallelism + selective recompute, micro-batch 1 per data rank; PP8 replaced by "
              "data parallelism) priced by the same cost model, beside the solver's plan:", "",
              "| plan | micro-batches | remat | step (s) | MFU | memory (GB) | fits 80 GB |", "|---|---|---|---|---|---|---|"]
    for label, r, fits in (("megatron-sp + selective", meg, meg["fits"]), ("solver", sol, True)):
        remat = ", ".join(f"{b}: {p}" for b, p in r["remat"].items()) or "none"
        lines.append(f"| {label} | {r['microbatches']} | {remat} | {r['step_time_s']:.1f} | {r['mfu']:.1%} | "
                     f"{r['peak_memory_gb']:.1f} | {'yes' if fits else 'no'} |")
    if not meg["fits"]:
        parts = ", ".join(f"{n} {gb:.1f}" for n, gb in meg["memory"].items() if n != "total")
        lines += ["", f"Megatron's layout without its pipeline holds every layer's weights and optimizer state on "
                  f"each data rank: {parts} GB per device."]
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
    lines += ["", f"Wall time {out['wall_s']:.0f} s on this host."]
    (RESULTS / f"memory_levers{suffix}.md").write_text("\n".join(lines) + "\n")
    plot(out, RESULTS / f"memory_levers{suffix}.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
