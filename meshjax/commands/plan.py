"""``meshjax plan``: solve a layout for a model and check it against XLA.

Example::

    $ meshjax plan                                   # gpt-tiny, 4x2 (data, model), train, verified
    $ meshjax plan gpt-small --mesh 4x2 --train --verify --json plan.json --hlo plan.hlo
    $ meshjax plan gpt-tiny --set batch=16,seq=64 --rules batch=data,mlp=model,seq=none
    $ meshjax plan my_model.py:make --mesh 8 --axes model --inference
    $ meshjax plan gpt3-175b --mesh 8x8 --hardware h100-2node --memory-limit 80GB --no-verify \
          --set batch=4,dtype=bfloat16,scan_layers=true

MODEL is a preset name (``meshjax.models.PRESETS``) or ``path/to/file.py:callable``. The
callable is called with the ``--set`` overrides as keyword arguments and returns either a
:class:`meshjax.models.Example` (anything with ``loss``, ``params`` and ``batch``) or a tuple
``(loss_fn, params, batch)``: ``loss_fn(params, *batch)`` returns a scalar ``NamedArray`` and
``params`` / ``batch`` hold ``NamedArray`` leaves whose values are concrete arrays or
``jax.ShapeDtypeStruct`` (abstract values are enough: nothing is run, only compiled).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from meshjax.errors import MeshjaxError
from meshjax.optimizer import OPTIMIZERS
from meshjax.pipeline.schedule import SCHEDULES


DEFAULT_MODEL = "gpt-demo"


def model_epilog() -> str:
    """The presets, hardware profiles and memory units, for ``--help`` (built only when shown:
    listing presets imports JAX)."""
    from meshjax.cost.hardware import PROFILES
    from meshjax.models import PRESETS
    from meshjax.units import UNITS_HELP

    profiles = "\n".join(f"  {name:<12} {hw.description}" for name, hw in PROFILES.items())
    presets = textwrap.fill(", ".join(PRESETS), width=76, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    units = textwrap.fill(f"{UNITS_HELP}; 80GB is 80e9 bytes", width=76, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
    return (
        f"model presets:\n{presets}\n  or path/to/file.py:callable (called with the --set values)\n\n"
        f"hardware profiles (--hardware):\n{profiles}\n\n"
        f"memory sizes (--memory-limit):\n{units}"
    )


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    """Arguments ``plan`` and ``compare`` share: the model and how to cost it."""
    parser.add_argument("model", nargs="?", default=default_model,
                        help=f"model preset or path/to/file.py:callable (default: {default_model})")
    parser.add_argument("--set", dest="overrides", default=None, metavar="K=V,...",
                        help="override model config fields, e.g. batch=8,seq=128,scan_layers=true")
    parser.add_argument("--train", dest="train", action="store_true", default=True,
                        help="plan a training step: loss + gradients + optimizer state (default)")
    parser.add_argument("--inference", dest="train", action="store_false", help="plan the forward pass only")
    parser.add_argument("--hardware", default="cpu-sim", help="hardware profile, see below (default: cpu-sim)")
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                        help="optimizer whose state training keeps (default: adam; fp32 moments and, for "
                        "bf16/fp16 params, fp32 master weights)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the result as JSON")
    parser.lazy_epilog = model_epilog


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="solve a layout for a model and (optionally) check it against XLA",
                               description="Solve a sharding layout for a model on a mesh and check it against XLA.")
    add_model_arguments(plan)
    plan.add_argument("--mesh", default="4x2",
                      help="mesh sizes, e.g. 8, 4x2, 2x2x2, or 'search': every data x stage x model mesh of "
                      "--devices N, pipelined or not, the fastest predicted plan kept (default: 4x2)")
    plan.add_argument("--axes", default=None, help="comma-separated mesh axis names (default: data,model for 2D)")
    plan.add_argument("--devices", type=int, default=None, metavar="N",
                      help="simulated CPU devices (default: the mesh's size); the mesh must use all N")
    plan.add_argument("--rules", default=None,
                      help='dim rules: "batch=data,mlp=model,seq=none" or "batch:data;seq:none"')
    plan.add_argument("--memory-limit", default="device", metavar="SIZE",
                      help="per-device memory budget, e.g. 16GiB or 80GB (units below); 'none' for no budget "
                      "(default: the hardware profile's memory less its reserve)")
    plan.add_argument("--zero", action="store_true", help="let optimizer state be sharded beyond its param (ZeRO-1)")
    add_lever_arguments(plan)
    plan.add_argument("--verify", dest="verify", action="store_true", default=None,
                      help="compile on simulated CPU devices and compare with XLA (default: on)")
    plan.add_argument("--no-verify", dest="verify", action="store_false", help="skip compiling")
    plan.add_argument("--hlo", default=None, metavar="FILE", help="write the compiled HLO text (implies compiling)")
    plan.add_argument("--top", type=int, default=20, help="rows of the cost table (default: 20)")
    add_pipeline_arguments(plan)


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """``--stage-axis``/``--remat-stages``/``--schedule``: ``plan`` and ``train`` share them (a pipeline's
    micro-batches are ``--microbatches``)."""
    parser.add_argument("--stage-axis", dest="stage_axis", default="stage", metavar="AXIS",
                        help="the mesh axis that pipelines the layer scan, when the mesh has it (default: stage)")
    parser.add_argument("--remat-stages", dest="remat_stages", default=None, choices=("on", "off"),
                        help="recompute each stage's forward in the backward pass (default: the solver picks; 1f1b: on)")
    parser.add_argument("--schedule", default="gpipe", choices=SCHEDULES,
                        help="the pipeline's schedule: gpipe (all forwards, then all backwards) or 1f1b (each "
                        "micro-batch's backward as soon as it can, fewer micro-batches held) (default: gpipe)")


def staged_overrides(args: argparse.Namespace, model_spec: str, overrides: dict[str, Any], mesh_shape: dict[str, int]) -> dict[str, Any]:
    """``overrides`` plus ``scan_layers=True`` when the mesh pipelines and the preset can scan
    its layers (a pipeline splits a scan), unless the user set it."""
    from meshjax import models

    if args.stage_axis not in mesh_shape or "scan_layers" in overrides or model_spec not in models.PRESETS:
        return overrides
    _, config = models.get(model_spec)
    return {**overrides, "scan_layers": True} if hasattr(config, "scan_layers") else overrides


def solve_for(args: argparse.Namespace, model_spec: str, overrides: dict[str, Any], graph, mesh_shape: dict[str, int], **kwargs: Any):
    """A pipelined plan when the mesh has ``--stage-axis``, else a plain one (with the memory
    levers ``remat`` and ``microbatches``)."""
    if args.stage_axis not in mesh_shape:
        from meshjax.solve import solve

        return solve(graph, mesh_shape, **kwargs)
    import meshjax as mj
    from meshjax.pipeline.plan import solve_pipelined

    if kwargs.pop("remat", "auto") not in ("auto", "none"):
        raise MeshjaxError("--remat chooses per-block recompute of an unpipelined plan; a pipeline recomputes per stage (--remat-stages on|off)")
    microbatches = kwargs.pop("microbatches", "auto")

    def trace_for(sizes):
        model = load_model(model_spec, {**overrides, **sizes})
        return mj.trace(model.loss, model.params, *model.batch)

    remat = None if args.remat_stages is None else args.remat_stages == "on"
    return solve_pipelined(
        trace_for, mesh_shape, axis=args.stage_axis, microbatches=None if microbatches == "auto" else microbatches,
        remat=remat, schedule=getattr(args, "schedule", "gpipe"), **kwargs,
    )


def search_axis_names(args: argparse.Namespace) -> tuple[str, str, str]:
    """``--axes`` of ``--mesh search``: data, stage, model (default ``data,<--stage-axis>,model``)."""
    from meshjax import validate

    names = validate.axis_names(args.axes) or ["data", args.stage_axis, "model"]
    if len(names) != 3:
        raise MeshjaxError(f"--mesh search --axes {args.axes!r}: expected three names (data, stage, model)")
    return tuple(names)


def search_mesh(args: argparse.Namespace, overrides: dict[str, Any], axes: tuple[str, str, str], console, **kwargs: Any):
    """``--mesh search``: the fastest plan over :func:`meshjax.pipeline.search.search_stages`'s
    meshes (a table of every candidate is printed)."""
    import meshjax as mj
    from meshjax.pipeline.search import best_of, search_stages

    if args.remat_stages is not None:
        raise MeshjaxError("--mesh search picks stage remat per mesh; drop --remat-stages")

    def trace_for(sizes):
        model = load_model(args.model, {**overrides, **sizes})
        return mj.trace(model.loss, model.params, *model.batch)

    results = search_stages(trace_for, args.devices, axes=axes, **kwargs)
    for mesh, plan in results:
        shape = " x ".join(f"{a} {n}" for a, n in mesh.items())
        if isinstance(plan, Exception):
            console.print(f"  {shape}: no plan ({str(plan)[:100]})")
            continue
        pipe = getattr(plan, "pipeline", None)
        how = f"{pipe.microbatches} micro-batches{', stage remat' if pipe.remat else ''}" if pipe else "unpipelined"
        console.print(f"  {shape}: step {plan.step_time_s * 1e3:.4f} ms, {plan.peak_memory_bytes / 1e9:.2f} GB ({how})")
    mesh, plan = best_of(results)
    console.print(f"mesh search over {args.devices} devices: {len(results)} meshes, best " + " x ".join(f"{a} {n}" for a, n in mesh.items()))
    return mesh, plan


def trace_model(model: Loaded):
    """The graph of ``model``; a user's loss that fails while tracing is reported in one line."""
    import meshjax as mj

    try:
        return mj.trace(model.loss, model.params, *model.batch)
    except MeshjaxError:
        raise
    except Exception as err:
        if model.name in _presets():
            raise
        raise MeshjaxError(f"model {model.name!r}: tracing its loss raised {type(err).__name__}: {err}") from None


def _presets() -> tuple[str, ...]:
    from meshjax.models import PRESETS

    return PRESETS


# --- shared helpers (used by ``compare`` too) -----------------------------------------------


def add_lever_arguments(parser: argparse.ArgumentParser) -> None:
    """``--remat`` and ``--microbatches``, shared by ``plan`` and ``train``."""
    parser.add_argument("--remat", default="auto", choices=("auto", "none", "selective", "full"),
                        help="rematerialisation of every repeated block; auto: the solver picks per block (default)")
    parser.add_argument("--microbatches", default="auto", metavar="auto|N",
                        help="gradient accumulation over N micro-batches; auto: the solver picks (default)")


def parse_microbatches(text: str) -> int | str:
    """``"auto"`` or a positive count."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise MeshjaxError(f"--microbatches {text!r}: expected auto or a positive integer")
    return value


def parse_overrides(text: str | None) -> dict[str, str]:
    """``"batch=8,seq=128"`` -> ``{"batch": "8", "seq": "128"}``: strings, typed by the config
    field (or the callable's keyword default) they set when the model is loaded."""
    from meshjax import validate

    return validate.parse_set(text)


@dataclass
class Loaded:
    """A model ready to trace and compile: ``loss(params, *batch)``."""

    name: str
    loss: Any
    params: Any
    batch: tuple


def load_model(spec: str, overrides: dict[str, Any], *, abstract: bool = True) -> Loaded:
    """A preset (``gpt-tiny``) or ``path/to/file.py:callable`` (see the module docstring)."""
    if ":" in spec and spec.split(":", 1)[0].endswith(".py"):
        return _load_callable(spec, overrides)
    from meshjax import models

    ex = models.example(spec, abstract=abstract, **overrides)
    return Loaded(spec, ex.loss, ex.params, tuple(ex.batch))


def _load_callable(spec: str, overrides: dict[str, Any]) -> Loaded:
    path, _, attr = spec.rpartition(":")
    if not os.path.isfile(path):
        raise MeshjaxError(f"model {spec!r}: no file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_meshjax_user_{abs(hash(path))}", path)
    if module_spec is None or module_spec.loader is None:
        raise MeshjaxError(f"model {spec!r}: cannot import {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        module_spec.loader.exec_module(module)
    except MeshjaxError:
        raise
    except Exception as err:  # a user's file: report, do not crash
        raise MeshjaxError(f"model {spec!r}: importing {path!r} failed: {type(err).__name__}: {err}") from None
    finally:
        sys.path.pop(0)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise MeshjaxError(f"model {spec!r}: {path!r} has no callable {attr!r}")
    from meshjax import validate

    typed = validate.callable_overrides(spec, fn, overrides)
    try:
        made = fn(**typed)
    except MeshjaxError as err:
        raise MeshjaxError(f"model {spec!r}: {attr}() failed: {err}") from None
    except Exception as err:  # a user's code: one line naming it, not a traceback
        args = ", ".join(f"{k}={v!r}" for k, v in typed.items())
        raise MeshjaxError(f"model {spec!r}: {attr}({args}) raised {type(err).__name__}: {err}") from None
    if all(hasattr(made, a) for a in ("loss", "params", "batch")):
        return Loaded(spec, made.loss, made.params, tuple(made.batch))
    if isinstance(made, tuple) and len(made) == 3 and callable(made[0]):
        loss, params, batch = made
        return Loaded(spec, loss, params, tuple(batch) if isinstance(batch, (tuple, list)) else (batch,))
    raise MeshjaxError(
        f"model {spec!r}: {attr}() must return a meshjax.models.Example or a tuple (loss_fn, params, batch), "
        f"got {type(made).__name__}"
    )


def setup_devices(count: int, requested: int | None, what: str) -> None:
    """Simulate ``requested`` (default ``count``) CPU devices; ``what`` must use all of them."""
    from meshjax.devices import use_cpu_devices

    if requested is not None:
        if requested < 1:
            raise MeshjaxError(f"--devices {requested}: must be positive")
        if requested != count:
            raise MeshjaxError(f"{what} has {count} devices but --devices is {requested}")
    use_cpu_devices(count)


def memory_limit(text: str | None, hardware) -> float | None:
    """``--memory-limit``: bytes, ``none`` (no budget) or ``device`` (the profile's usable memory).

    >>> from meshjax.cost.hardware import PROFILES
    >>> memory_limit("none", PROFILES["h100-node"]), memory_limit("device", PROFILES["h100-node"]) / 1e9
    (None, 72.0)
    """
    from meshjax import validate

    return validate.memory_budget(text, "--memory-limit", hardware)


def compiled_json(report) -> dict[str, Any]:
    return {"comm_bytes": report.comm_bytes, "collectives": report.by_kind(), "memory": report.memory}


def plan_json(model: str, plan, check=None) -> dict[str, Any]:
    """The ``meshjax plan --json`` document (schema in docs/cli.md)."""
    full = plan.to_json()
    out: dict[str, Any] = {
        "model": model,
        "mesh": full["mesh"],
        "hardware": full["hardware"],
        "train": full["train"],
        "tensors": full["tensors"],
        "rules": full["rules"],
        "settings": full["settings"],
        "predicted": {
            "step_time_s": plan.step_time_s,
            "comm_bytes": plan.comm_bytes,
            "peak_memory_bytes": plan.peak_memory_bytes,
            "memory_breakdown": plan.memory_breakdown(),
        },
    }
    if check is not None:  # a meshjax.verify.Verification
        out["compiled"] = compiled_json(check.compiled)
        out["verification"] = check.ratios_json()
    out["remat"] = full["remat"]
    out["microbatches"] = full["microbatches"]
    if "pipeline" in full:
        out["pipeline"] = full["pipeline"]
    out["solve_time_s"] = plan.solve_time_s
    return out


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    # Check every argument and configure simulated devices before anything starts a JAX backend.
    from meshjax import validate
    from meshjax.cost.hardware import get_hardware
    from meshjax.devices import parse_mesh_shape
    from meshjax.layout import parse_rules
    from meshjax.units import format_bytes

    searching = args.mesh == "search"
    if searching:
        if args.devices is None:
            raise MeshjaxError("--mesh search needs --devices N (the device count to factorise)")
        validate.count(args.devices, "--devices", minimum=1)
        search_axes = search_axis_names(args)
        args.stage_axis = search_axes[1]
        mesh_shape = {search_axes[0]: args.devices, search_axes[1]: 1, search_axes[2]: 1}
    else:
        mesh_shape = parse_mesh_shape(args.mesh, validate.axis_names(args.axes))
    hardware = get_hardware(args.hardware)
    budget = memory_limit(args.memory_limit, hardware)
    rules = parse_rules(args.rules) if args.rules else None
    overrides = staged_overrides(args, args.model, parse_overrides(args.overrides), mesh_shape)
    microbatches = parse_microbatches(args.microbatches)
    validate.count(args.top, "--top", minimum=0)
    validate.writable_file(args.json_path, "--json")
    validate.writable_file(args.hlo, "--hlo")
    compile_it = (True if args.verify is None else args.verify) or bool(args.hlo)
    n = math.prod(mesh_shape.values())
    if compile_it or (args.devices is not None and not searching):
        setup_devices(n, args.devices, f"mesh {args.mesh}")

    from meshjax import commands

    console = commands.console()
    model = load_model(args.model, overrides)
    graph = trace_model(model)
    if budget is not None:
        console.print(f"memory limit {format_bytes(budget)} per device")
    solve_kwargs = dict(
        hardware=hardware, train=args.train, rules=rules, memory_budget=budget, optimizer=args.optimizer,
        zero=getattr(args, "zero", False), remat=args.remat if args.train else "none",
        microbatches=microbatches if args.train else 1,
    )
    if searching:
        mesh_shape, plan = search_mesh(args, overrides, search_axes, console, **solve_kwargs)
    else:
        plan = solve_for(args, args.model, overrides, graph, mesh_shape, **solve_kwargs)

    check = None
    tries = ()
    if compile_it:
        from meshjax.devices import make_mesh
        from meshjax.hlo import inspect_compiled
        from meshjax.verify import Verification, compile_plan, keep_budget, platform_of

        mesh = make_mesh(mesh_shape)
        last = {}  # the plan measured last, its executable and report

        def measure(p):
            # Training plans compile the whole Adam step, which holds what the plan's memory counts.
            compiled = compile_plan(p, model.loss, mesh, model.params, *model.batch)
            last.update(plan=p, compiled=compiled, report=inspect_compiled(compiled, mesh))
            return last["report"].memory.get("peak_bytes")

        plan, tries = keep_budget(plan, budget, measure, lambda b: solve_for(args, args.model, overrides, graph, mesh_shape,
                                                                          **{**solve_kwargs, "memory_budget": b}))
        for t in tries:
            console.print(f"note: solved for {format_bytes(t.solved_for)}, the step compiled to {format_bytes(t.compiled)}, "
                          f"above the {format_bytes(budget)} budget: solving again under a budget less the overshoot")
        if last.get("plan") is not plan:
            measure(plan)
        compiled, report = last["compiled"], last["report"]
    console.print(plan.table())
    console.print(plan.cost_table(top=args.top))
    console.print(plan.summary())

    if compile_it:
        if args.hlo:
            with open(args.hlo, "w") as f:
                f.write(compiled.as_text())
            console.print(f"wrote compiled HLO to {args.hlo}")
        check = Verification(plan, report, platform_of(mesh))
        console.print(check.compiled.table())
        if not hasattr(plan, "pipeline"):  # per-op attribution: the pipeline's loop has no op names
            console.print(check.op_table())
        predicted_mem = plan.peak_memory_bytes
        compiled_mem = check.compiled.memory.get("peak_bytes")
        console.print(f"comm bytes/step: predicted {check.predicted_comm_bytes:,.0f}, compiled {check.compiled.comm_bytes:,}")
        console.print(
            f"memory/device:   predicted {predicted_mem:,.0f}, compiled "
            + (f"{compiled_mem:,} (arguments + outputs + temporaries - aliased)" if compiled_mem is not None else "n/a")
        )
        if check.lowering_note:
            console.print(f"note: {check.lowering_note}")
        warning = check.out_of_band()
        if warning:
            console.print(f"[bold yellow]warning:[/] {warning}")
    if args.json_path:
        doc = plan_json(model.name, plan, check)
        if tries:
            doc["budget_tries"] = [{"solved_for": t.solved_for, "compiled_bytes": t.compiled} for t in tries]
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
        console.print(f"wrote {args.json_path}")
    return 0
