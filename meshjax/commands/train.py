"""``meshjax train``: train a model preset on the shipped text under a solved plan.

Example::

    $ meshjax train gpt-tiny --mesh 4x2 --steps 100 --losses-json losses.json
    $ meshjax train gpt-tiny --mesh 4x2 --steps 50 --checkpoint ckpt --save-every 25
    $ meshjax train gpt-tiny --mesh 2x4 --steps 100 --resume ckpt     # continues at step 50
    $ meshjax train gpt-tiny --mesh 2x2x2 --axes data,model,stage --set layers=4,scan_layers=true

A mesh axis named ``stage`` (``--stage-axis``) pipelines the scanned layer stack over it
(``--microbatches``, ``--remat-stages``; by default the solver picks them).

Tokens are bytes, so the model's vocab is set to 256. ``--steps`` is the total step count: a
resumed run continues from the checkpoint's step up to it.

Several processes (``meshjax launch --processes 2 --devices-per-process 4 -- meshjax train ...``,
or ``--distributed`` on a cluster JAX detects) train one global mesh: each builds only its rows
of every batch, process 0 alone prints and writes ``--losses-json``, and all of them write their
shards of a checkpoint (``--checkpoint`` must be on a filesystem every process sees).
"""

from __future__ import annotations

import argparse

from meshjax.commands.plan import add_lever_arguments
import json
import math
import os
import time
from typing import Any

from meshjax.optimizer import OPTIMIZERS


def add_parser(commands) -> None:
    from meshjax.commands.plan import add_pipeline_arguments

    p = commands.add_parser("train", help="train a model preset on the shipped text under a solved plan",
                            description="Train a language-model preset on the shipped text under a solved plan.")
    p.add_argument("model", nargs="?", default="gpt-tiny", help="model preset (default: gpt-tiny)")
    p.add_argument("--mesh", default="4x2", help="mesh sizes, e.g. 8, 4x2 (default: 4x2)")
    p.add_argument("--axes", default=None, help="comma-separated mesh axis names (default: data,model for 2D)")
    p.add_argument("--steps", type=int, default=100, help="total training steps (default: 100)")
    p.add_argument("--batch", type=int, default=None, help="global batch size (default: the preset's)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default: 3e-3)")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="adam, sgd or adafactor (default: adam; fp32 master weights for bf16/fp16 params)")
    p.add_argument("--hardware", default="cpu-sim", help="hardware profile for the solver (default: cpu-sim)")
    p.add_argument("--rules", default=None, help='dim rules for the solver, e.g. "batch:data;mlp:model"')
    p.add_argument("--set", dest="overrides", default=None, metavar="K=V,...",
                   help="override model config fields, e.g. layers=4,scan_layers=true")
    p.add_argument("--memory-limit", default=None, help="per-device memory budget for the solver, e.g. 16GiB, or none (default: none)")
    add_lever_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the params and the batches (default: 0)")
    p.add_argument("--losses-json", dest="losses_json", default=None, metavar="FILE", help="write the losses as JSON")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="save a checkpoint here at the end")
    p.add_argument("--save-every", dest="save_every", type=int, default=None, metavar="N",
                   help="also save every N steps (needs --checkpoint)")
    p.add_argument("--resume", default=None, metavar="DIR", help="restore the latest checkpoint in DIR first")
    add_pipeline_arguments(p)
    p.add_argument("--skip-damaged", dest="skip_damaged", action="store_true",
                   help="with --resume: if the latest step is damaged, resume from the newest intact one")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run that JAX detects (SLURM, TPU pods, Kubernetes); "
                        "runs started by `meshjax launch` join automatically")


def run(args: argparse.Namespace) -> int:
    from meshjax import validate
    from meshjax.commands.plan import parse_microbatches, parse_overrides
    from meshjax.devices import parse_mesh_shape, use_cpu_devices
    from meshjax.errors import MeshjaxError

    mesh_shape = parse_mesh_shape(args.mesh, validate.axis_names(args.axes))
    validate.count(args.steps, "--steps", minimum=0)
    if args.save_every is not None and (args.save_every < 1 or not args.checkpoint):
        raise MeshjaxError("--save-every needs a positive N and --checkpoint DIR")
    for flag in ("batch", "seq"):
        value = getattr(args, flag)
        if value is not None:
            validate.count(value, f"--{flag}")
    validate.positive_number(args.lr, "--lr")
    validate.writable_file(args.losses_json, "--losses-json")
    validate.writable_dir(args.checkpoint, "--checkpoint")
    config_overrides = parse_overrides(args.overrides)
    microbatches = parse_microbatches(args.microbatches)
    budget = validate.memory_budget(args.memory_limit, "--memory-limit")  # "none" is no budget, as in plan
    if args.resume and not os.path.isdir(args.resume):
        raise MeshjaxError(f"--resume: no checkpoint directory {args.resume!r}")
    if args.skip_damaged and not args.resume:
        raise MeshjaxError("--skip-damaged needs --resume DIR")
    from meshjax import models

    def is_lm(name: str) -> bool:
        module, config = models.get(name)
        return {"batch", "seq", "vocab"} <= set(module.sizes(config)) and len(module.abstract_batch(config)) == 2

    if not is_lm(args.model):
        lms = [n for n in models.PRESETS if is_lm(n)]
        raise MeshjaxError(
            f"model {args.model!r} is not a language model; train needs one (tokens -> next token), "
            f"e.g. {', '.join(lms[:4])}"
        )
    # Before anything starts a JAX backend.
    from meshjax import distributed

    total = math.prod(mesh_shape.values())
    if distributed.env_config() is not None:  # started by `meshjax launch`
        distributed.initialize(local_devices=distributed.local_cpu_devices(total))
    elif args.distributed:
        distributed.initialize()
    else:
        use_cpu_devices(total)

    import warnings

    import jax
    import numpy as np
    from meshjax import commands
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    import meshjax as mj
    from meshjax import checkpoint, data
    from meshjax.cost.hardware import hardware_for
    from meshjax.data import lm_batch
    from meshjax.devices import global_mesh, make_mesh
    from meshjax.optimizer import Optimizer
    from meshjax.train import make_train_step

    if args.resume:
        saved = checkpoint.steps(args.resume)
        if not saved:
            raise MeshjaxError(f"--resume {args.resume!r}: no checkpoint steps there")
        if saved[-1] >= args.steps and not args.skip_damaged:
            raise MeshjaxError(
                f"--steps {args.steps}: the checkpoint in {args.resume!r} is already at step {saved[-1]}; "
                f"--steps is the total, so ask for more than {saved[-1]}"
            )

    multi = jax.process_count() > 1
    quiet = not distributed.is_main_process()  # process 0 speaks
    console = commands.console(quiet=quiet)  # what the run did: stdout
    progress_console = commands.console(stderr=True, quiet=quiet)  # the live progress bar: stderr
    from meshjax.commands.plan import solve_for, staged_overrides

    overrides: dict[str, Any] = {**staged_overrides(args, args.model, config_overrides, mesh_shape), "vocab": data.VOCAB}
    if args.batch is not None:
        overrides["batch"] = args.batch
    if args.seq is not None:
        overrides["seq"] = args.seq
    _, config = models.get(args.model, **overrides)
    example = models.example(args.model, key=args.seed, **overrides)
    batch, seq = config.batch, config.seq

    graph = mj.trace(example.loss, example.params, *example.batch)
    # With several processes the processes span the outer axes, and the solver prices the
    # axes that cross them on the slow link.
    mesh = global_mesh(mesh_shape) if multi else make_mesh(mesh_shape)
    hardware = hardware_for(args.hardware, mesh) if multi else args.hardware
    optimizer = Optimizer(args.optimizer, args.lr)
    plan = solve_for(args, args.model, overrides, graph, mesh_shape, hardware=hardware, train=True, rules=args.rules,
                     optimizer=optimizer, memory_budget=budget, remat=args.remat, microbatches=microbatches)
    trainer = make_train_step(plan, example.loss, mesh)
    procs = f", {jax.process_count()} processes x {jax.local_device_count()} devices" if multi else ""
    console.print(f"{args.model}: batch {batch}, seq {seq}, vocab {data.VOCAB}, mesh {mesh_shape}{procs}; {plan.summary()}")

    if args.resume:
        with warnings.catch_warnings(record=True) as skipped:
            warnings.simplefilter("always", checkpoint.CheckpointWarning)
            state = checkpoint.restore(args.resume, plan, mesh, trainer.abstract_state(), fallback=args.skip_damaged)
        for w in skipped:
            progress_console.print(f"meshjax: warning: {w.message}", highlight=False)
        if state.step >= args.steps:
            raise MeshjaxError(
                f"--steps {args.steps}: the newest intact checkpoint in {args.resume!r} is already at step "
                f"{state.step}; --steps is the total, so ask for more than {state.step}"
            )
        console.print(f"resumed from {args.resume} at step {state.step}")
    else:
        state = trainer.init(example.params)
    start = state.step

    losses: list[float] = []
    times: list[float] = []
    saved_at: list[int] = []
    columns = (
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ms]} ms/step"), TimeRemainingColumn(),
    )
    with Progress(*columns, console=progress_console, transient=False) as progress:
        task = progress.add_task("train", total=args.steps, completed=min(start, args.steps), loss="-", ms="-")
        if multi:  # each process builds only the rows its devices hold
            host_batches = (lm_batch(i, batch, seq, seed=args.seed) for i in range(start, max(start, args.steps)))
        else:
            host_batches = data.batches(batch, seq, seed=args.seed, start=start, steps=max(0, args.steps - start))
        for host_batch in host_batches:
            t = time.perf_counter()
            new_state, loss = trainer.step(state, *host_batch)
            value = float(loss)  # waits for the step
            dt = time.perf_counter() - t
            if not math.isfinite(value):
                kept = f"; last checkpoint: step {saved_at[-1]} in {args.checkpoint}" if saved_at else (
                    "; nothing was saved" if args.checkpoint else "")
                raise MeshjaxError(
                    f"step {state.step + 1}: loss is {value} (lr {args.lr:g}); training stopped{kept}"
                )
            state = new_state
            losses.append(value)
            times.append(dt)
            progress.update(task, advance=1, loss=f"{value:.4f}", ms=f"{dt * 1e3:.1f}")
            if args.save_every and state.step % args.save_every == 0 and state.step < args.steps:
                checkpoint.save(args.checkpoint, state)
                saved_at.append(state.step)
    if args.checkpoint and state.step not in saved_at:
        checkpoint.save(args.checkpoint, state)
        saved_at.append(state.step)
        console.print(f"saved step {state.step} to {args.checkpoint}")
    if losses:
        console.print(f"steps {start + 1}..{state.step}: loss {losses[0]:.4f} -> {losses[-1]:.4f}, "
                      f"median {np.median(times[1:] or times) * 1e3:.1f} ms/step (first step compiles)")
    if args.losses_json and distributed.is_main_process():
        out = {
            "model": args.model,
            "mesh": mesh_shape,
            "batch": batch,
            "seq": seq,
            "lr": args.lr,
            "seed": args.seed,
            "start_step": start,
            "steps": list(range(start + 1, state.step + 1)),
            "losses": losses,
            "step_time_s": times,
            "saved_steps": saved_at,
            "specs": {name: str(spec) for name, spec in plan.param_specs.items()},
            "processes": jax.process_count(),
        }
        if hasattr(plan, "pipeline"):
            out["pipeline"] = plan.pipeline.to_json()
        with open(args.losses_json, "w") as f:
            json.dump(out, f, indent=2)
        console.print(f"wrote {args.losses_json}")
    return 0
