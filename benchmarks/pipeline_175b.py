"""GPT-3 175B on 1024 devices: the solver's pipelined plan against Megatron's published
configuration and FSDP alone, all priced by meshjax's cost model, beside the published figure.

Rows (batch 1536 sequences of 2048 tokens, bfloat16, Adam, 80 GB per device):

- **solver**: the mesh search with a stage axis (``meshjax.pipeline.search.search_stages``,
  what ``meshjax plan --mesh search --devices 1024`` runs) over ``data x stage x model`` meshes
  of 1024 devices with ``model`` 8 (one node) and ``stage`` 1 (unpipelined: the solver's
  FSDP + tensor parallelism with its remat and accumulation levers) or 2, 4, 8, 16, 32; per
  mesh the micro-batch count, stage remat and every tensor's layout are chosen by the solver.
  The best row is the solver's plan; the others are listed below it.
- **Megatron PTD-P** (Narayanan et al. 2021, table 1: TP 8, PP 8, DP 16, micro-batch 1, so
  96 micro-batches of 16 sequences): tensor parallelism pinned by rules (heads, mlp, vocab on
  ``model``; batch on ``data``), priced with the 1F1B schedule's memory (``p`` micro-batches
  in flight), with activation recompute (the forward once more: the paper's full recompute;
  selective recompute would cost less time and keep more) and without; also with PP 16.
- **solver, 1F1B**: what the solver picks on its best mesh if the schedule were 1F1B, which
  meshjax prices but does not lower.
- **FSDP**: ZeRO-3, every param split over all 1024 devices, no tensor or pipeline
  parallelism. 1536 rows do not split 1024 ways, so the mesh is ``data 512 x seq 2`` with the
  activations laid out by the solver (an optimistic price).
- **published**: Narayanan et al. 2021 (arXiv:2104.04473), table 1, the 175B row: 1024 A100s,
  batch 1536, TP 8, PP 8, 140 teraFLOP/s per GPU (45% of the 312 TFLOP/s peak; 143 PFLOP/s
  aggregate), converted to a step time with the paper's FLOP count (its eq. 3, which counts the
  recomputed forward).

Each row is priced on ``a100-selene`` (the paper's cluster) and ``h100-2node``. MFU counts the
model's own flops (forward + backward, no recompute) against peak.

    $ python benchmarks/pipeline_175b.py            # ~1-2 minutes on 2 cores

Writes ``benchmarks/results/pipeline_175b.{json,md}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from meshjax.baselines import BASELINES, predict
from meshjax.cost.hardware import get_hardware
from meshjax.errors import InfeasibleError
from meshjax.pipeline import Pipeline
from meshjax.pipeline.plan import plan_stage, solve_pipelined
from meshjax.pipeline.search import best_of, search_stages
from meshjax.pipeline.stage_graph import scan_block
from meshjax.pipeline.stage_graph import preset_tracer

RESULTS = Path(__file__).parent / "results"
DEVICES = 1024
BUDGET = 80e9
SETTINGS = dict(batch=1536, seq=2048, dtype="bfloat16", scan_layers=True)
MEGATRON_RULES = "batch:data;heads:model;mlp:model;vocab:model"
# Narayanan et al. 2021, table 1 (GPT-3 175B row): 1024 A100s, batch 1536, TP 8, PP 8.
PUBLISHED_TFLOPS_PER_GPU = 140e12


def published_flops_per_step(B=1536, s=2048, l=96, h=12288, V=51200) -> float:
    """The paper's FLOPs per iteration (its eq. 3: forward, backward and recomputed forward)."""
    return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))


def model_flops(graph) -> float:
    """Forward + backward flops of the whole model (no recompute): 3 x the forward's."""
    return 3 * sum(op.index.flops * graph.trip_count(op.block) for op in graph.ops)


def row(name, config, plan_or_error, hw_name, flops, peak) -> dict:
    if isinstance(plan_or_error, Exception):
        return {"strategy": name, "config": config, "hardware": hw_name, "error": str(plan_or_error)[:160]}
    plan = plan_or_error
    t = plan.step_time_s
    out = {
        "strategy": name, "config": config, "hardware": hw_name, "step_time_s": t,
        "mfu": flops / (t * peak * DEVICES), "memory_gb": plan.peak_memory_bytes / 1e9,
        "fits": plan.peak_memory_bytes <= BUDGET,
    }
    if hasattr(plan, "pipeline"):
        out["pipeline"] = plan.cost.to_json()
    return out


def label(mesh, plan) -> str:
    shape = " x ".join(f"{a} {n}" for a, n in mesh.items())
    if isinstance(plan, Exception):
        return shape
    pipe = getattr(plan, "pipeline", None)
    if pipe is None:
        remat = ", ".join(f"{b} {p}" for b, p in plan.remat.items() if p != "none") or "no remat"
        return f"{shape} (unpipelined; {plan.microbatches} micro-batches, {remat})"
    return f"{shape}, m={pipe.microbatches}{', stage remat' if pipe.remat else ''}"


def memory_split(plan) -> dict[str, float]:
    """A pipelined plan's bytes per device: weights' state (params, gradients, optimizer, and
    1F1B's float32 gradient accumulators), what runs outside the pipeline on the whole local
    batch (embedding, head, loss, the micro-batch buffers), the stages' own activations
    (resident: their kept inputs), a time slot's recomputed activations (the stage's and, with
    1F1B, the head's, transient) and the backward pass's peak."""
    sp = plan.stage_plan
    block = scan_block(plan.graph, plan.pipeline)
    out = {"state": 0.0, "outside": 0.0, "stages": 0.0, "recompute": sp.memory.get("recompute", 0.0),
           "backward_peak": sp.memory.get("backward_peak", 0.0)}
    for node, c in zip(sp.problem.nodes, sp.solution.choice):
        for kind, values in node.parts.items():
            v = float(values[c])
            if kind in ("params", "gradients", "optimizer_state") or node.op is None:
                out["state"] += v
            elif node.op is not None and node.op.block == block:
                out["stages"] += v
            else:
                out["outside"] += v
    return out


def log(text: str) -> None:
    print(text, flush=True)


def main() -> None:
    trace_for = preset_tracer("gpt3-175b", **SETTINGS)
    full = trace_for({})
    flops = model_flops(full)
    rows = []
    for hw_name in ("a100-selene", "h100-2node"):
        peak = get_hardware(hw_name).peak_flops("bfloat16")
        start = time.perf_counter()
        searched = search_stages(trace_for, DEVICES, model_sizes=[8], train=True, hardware=hw_name, memory_budget=BUDGET,
                                 remat="auto", microbatches="auto")
        for mesh, plan in searched:
            log(f"{hw_name} solver {mesh}: {getattr(plan, 'step_time_s', plan)}")
        search_s = time.perf_counter() - start
        best_mesh, best = best_of(searched)
        rows.append({**row("solver", label(best_mesh, best), best, hw_name, flops, peak), "search_s": search_s})
        for stages in (8, 16):
            data = DEVICES // (stages * 8)
            mesh = {"data": data, "stage": stages, "model": 8}
            for remat in (True,):  # meshjax's 1F1B always recomputes each stage's forward
                pipe = Pipeline(stages=stages, microbatches=SETTINGS["batch"] // data, schedule="1f1b", remat=remat)
                t0 = time.perf_counter()
                try:
                    plan = plan_stage(trace_for, full, mesh, pipe, train=True, hardware=hw_name, rules=MEGATRON_RULES)
                except InfeasibleError as err:
                    plan = err
                log(f"{hw_name} megatron PP{stages} remat={remat}: {getattr(plan, 'step_time_s', plan)} ({time.perf_counter() - t0:.1f} s)")
                what = "activation recompute" if remat else "no recompute"
                r = row("megatron", f"TP 8, PP {stages}, DP {data}, micro-batch 1 (m={pipe.microbatches}, 1F1B, {what})",
                        plan, hw_name, flops, peak)
                if not isinstance(plan, Exception):
                    r["memory_split_gb"] = {k: v / 1e9 for k, v in memory_split(plan).items()}
                rows.append(r)
        # The best pipelined mesh under the 1F1B schedule.
        t0 = time.perf_counter()
        staged = [(m, p) for m, p in searched if "stage" in m and not isinstance(p, Exception)]
        best_staged = min(staged, key=lambda mp: mp[1].step_time_s)[0]
        plan = solve_pipelined(trace_for, best_staged, schedule="1f1b", train=True, hardware=hw_name, memory_budget=BUDGET)
        log(f"{hw_name} solver 1f1b: {plan.step_time_s} ({time.perf_counter() - t0:.1f} s)")
        rows.append(row("solver, 1F1B", label(best_staged, plan), plan, hw_name, flops, peak))
        fsdp_mesh = {"data": 512, "seq": 2}
        base = BASELINES["fsdp"](full, fsdp_mesh)
        params = {t.name: base.layouts[t.name] for t in full.params}
        t0 = time.perf_counter()
        plan, _ = predict(full, fsdp_mesh, params, hardware=hw_name, train=True)
        log(f"{hw_name} fsdp: {plan.step_time_s} ({time.perf_counter() - t0:.1f} s)")
        rows.append(row("fsdp", "ZeRO-3 over 1024 (data 512 x seq 2)", plan, hw_name, flops, peak))
        for mesh, plan in searched:
            if plan is not best:
                rows.append(row("solver (other meshes)", label(mesh, plan), plan, hw_name, flops, peak))
    published_t = published_flops_per_step() / (PUBLISHED_TFLOPS_PER_GPU * DEVICES)
    rows.append({
        "strategy": "published", "config": "Megatron-LM on 1024 A100 (Narayanan et al. 2021, table 1)",
        "hardware": "A100 (measured)", "step_time_s": published_t,
        "mfu": flops / (published_t * 312e12 * DEVICES), "memory_gb": None, "fits": True,
    })
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_175b.json").write_text(json.dumps({"settings": SETTINGS, "devices": DEVICES, "model_flops": flops, "rows": rows}, indent=2))
    lines = [
        "# GPT-3 175B on 1024 devices: predicted step time and MFU",
        "",
        f"Batch {SETTINGS['batch']} x seq {SETTINGS['seq']}, bfloat16, Adam, budget 80 GB/device; "
        f"model flops per step {flops:.3e}. Generated by `benchmarks/pipeline_175b.py`.",
        "",
        "MFU: the model's flops (forward + backward, no recompute) / (step x peak x 1024). The published row converts "
        "140 TFLOP/s per GPU (Narayanan et al. 2021, arXiv:2104.04473, table 1, the 175B row: 1024 A100s, batch 1536, "
        "TP 8, PP 8; 45% of peak, 143 PFLOP/s aggregate; it counts the recomputed forward) to a step time with the "
        "paper's FLOP formula (its eq. 3).",
        "",
        "Both schedules sum the stage weights' data-parallel gradients once per step, after the pipeline's loop "
        "(each data replica of a stage accumulates its own over the time slots), as both lowerings do.",
        "",
        "| strategy | configuration | hardware | step (s) | MFU | memory (GB) | fits 80 GB | bubble |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['config']} | {r['hardware']} | infeasible | | | no | |")
            continue
        bubble = f"{r['pipeline']['bubble_fraction']:.1%}" if "pipeline" in r else ""
        memory = f"{r['memory_gb']:.1f}" if r["memory_gb"] is not None else ""
        lines.append(f"| {r['strategy']} | {r['config']} | {r['hardware']} | {r['step_time_s']:.2f} | {r['mfu']:.1%} | "
                     f"{memory} | {'yes' if r['fits'] else 'no'} | {bubble} |")
    split = [r for r in rows if "memory_split_gb" in r and r["hardware"] == "a100-selene"]
    if split:
        lines += [
            "",
            "## Where the Megatron rows' memory goes (GB per device, as meshjax lowers them)",
            "",
            "Megatron holds the weights' state and, with 1F1B and recompute, a few micro-batches' layer inputs. "
            "meshjax's 1F1B lowering runs the head and the loss per micro-batch, but on every stage (replicated over "
            "the stage axis), and the embedding on the whole local batch; it keeps the pipeline's input and "
            "input-gradient buffers (a whole local batch each): the *outside* column and most of the backward "
            "pass's peak. Megatron runs the embedding on the first stage and the head on the last, so its memory is "
            "near *state + stages*.",
            "",
            "| configuration | state (params, grads, Adam, 1F1B accumulators) | stages' kept inputs | outside the pipeline | "
            "a slot's recompute | backward peak | total |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in split:
            m = r["memory_split_gb"]
            lines.append(f"| {r['config']} | {m['state']:.1f} | {m['stages']:.1f} | {m['outside']:.1f} | "
                         f"{m['recompute']:.1f} | {m['backward_peak']:.1f} | {r['memory_gb']:.1f} |")
    (RESULTS / "pipeline_175b.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
