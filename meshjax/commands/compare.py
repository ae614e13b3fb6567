"""``meshjax compare``: the solver's plan against hand-written strategies on every mesh shape.

Example::

    $ meshjax compare gpt-tiny --devices 8                      # 8, 8 (model), 2x4, 4x2
    $ meshjax compare gpt-small --devices 8 --meshes 4x2 --hardware h100-node --json cmp.json
    $ meshjax compare gpt3-1.3b --devices 64 --hardware h100-2node   # large: predictions only
    $ meshjax compare vit.py:make --roles batch=img,mlp=ffn            # your model's dim names
    $ meshjax compare gpt-tiny --devices 8 --set layers=4 --stage   # + 3-D data x model x stage

With ``--stage`` every ``data x model x stage`` mesh is added with the solver's pipelined plan
(:mod:`meshjax.pipeline`; the preset's layers are scanned for every row).

For each mesh (the 1D mesh as ``data`` and as ``model``, then every 2D factorisation
``data x model`` with both sizes above one) it solves a plan and lays out each baseline of
:mod:`meshjax.baselines`, prices all of them with the same cost model (predicted step time and
memory per device under ``--hardware``) and, with ``--verify`` (the default for models under
10M parameters), compiles each on simulated CPU devices and reads XLA's comm bytes back.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Any

from meshjax.commands.plan import (
    add_model_arguments, compiled_json, load_model, parse_overrides, setup_devices, trace_model,
)
from meshjax.errors import MeshjaxError
from meshjax.units import format_bytes

SMALL_MODEL_PARAMS = 10_000_000


def add_parser(commands) -> None:
    cmp = commands.add_parser("compare", help="the solver's plan against hand-written strategies on every mesh shape",
                              description=__doc__.split("\n\n")[0])
    add_model_arguments(cmp, default_model="gpt-tiny")
    cmp.add_argument("--devices", type=int, default=8, metavar="N", help="device count (default: 8)")
    cmp.add_argument("--meshes", default=None,
                     help="comma-separated meshes to compare, e.g. 8,4x2 (1D meshes are named data; "
                          "write model:8 for a 1D model axis); default: all")
    cmp.add_argument("--strategies", default=None,
                     help="comma-separated subset of solver," + ",".join(_baseline_names()) + " (default: all)")
    cmp.add_argument("--roles", default=None, metavar="ROLE=DIM,...",
                     help="which of the model's dims play the baselines' roles (batch, mlp, heads, vocab, experts, "
                          "embed, seq; default: the dims of those names), e.g. batch=img,mlp=ffn")
    cmp.add_argument("--verify", dest="verify", action="store_true", default=None,
                     help=f"compile each layout and read XLA's comm bytes (default: on under {SMALL_MODEL_PARAMS:,} params)")
    cmp.add_argument("--no-verify", dest="verify", action="store_false", help="predictions only")
    cmp.add_argument("--stage", action="store_true",
                     help="also compare 3-D meshes data x model x stage: the solver's pipelined plan (layers scanned)")


def _baseline_names() -> list[str]:
    from meshjax.baselines import BASELINES

    return list(BASELINES)


def mesh_shapes(n: int) -> list[dict[str, int]]:
    """The 1D mesh as ``data`` and as ``model``, then ``data x model`` for every factorisation
    of ``n`` into two factors > 1.

    >>> mesh_shapes(8)
    [{'data': 8}, {'model': 8}, {'data': 2, 'model': 4}, {'data': 4, 'model': 2}]
    """
    from meshjax.solve import factorisations

    out: list[dict[str, int]] = [{"data": n}, {"model": n}] if n > 1 else [{"data": 1}]
    return out + [{"data": a, "model": b} for a, b in (f for f in factorisations(n, 2) if len(f) == 2) if a > 1 and b > 1]


def stage_meshes(n: int) -> list[dict[str, int]]:
    """``data x model x stage`` for every factorisation with at least two stages and two
    devices per stage (a pipeline whose stages are single devices is listed too when n allows)."""
    out = []
    for stages in range(2, n + 1):
        if n % stages:
            continue
        rest = n // stages
        for data in range(1, rest + 1):
            if rest % data == 0:
                out.append({"data": data, "model": rest // data, "stage": stages})
    return out


def parse_meshes(text: str, n: int) -> list[dict[str, int]]:
    from meshjax.devices import parse_mesh_shape

    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if ":" in item:
            name, _, size = item.partition(":")
            shape = parse_mesh_shape(size, [name.strip()])
        else:
            shape = parse_mesh_shape(item)
        if math.prod(shape.values()) != n:
            raise MeshjaxError(f"mesh {item!r} has {math.prod(shape.values())} devices but --devices is {n}")
        out.append(shape)
    if not out:
        raise MeshjaxError(f"--meshes {text!r}: no mesh given")
    return out


def mesh_label(shape: dict[str, int]) -> str:
    if len(shape) == 1:
        (name, size), = shape.items()
        return f"{size} ({name})"
    label = "x".join(str(s) for s in shape.values())
    return label if len(shape) == 2 else f"{label} ({','.join(shape)})"


@dataclass
class Entry:
    """One strategy on one mesh: the layouts to compile and the plan that prices them."""

    strategy: str
    mesh: dict[str, int]
    layouts: dict  # name -> Layout: what is pinned when compiled
    plan: Any  # meshjax.plan.Plan
    notes: list[str] = field(default_factory=list)
    partial: bool = False
    report: Any = None  # CompiledReport once compiled
    compile_s: float | None = None

    def layout_key(self) -> tuple:
        """What the compiled program depends on: the pinned layouts, operands' included."""
        operands = () if self.partial else tuple(
            sorted((op, tuple(l.axes for l in ls)) for op, ls in self.plan.operand_layouts.items())
        )
        computed = () if self.partial else tuple(sorted((op, l.axes) for op, l in self.plan.computed_layouts.items()))
        return (tuple(self.mesh.items()), self.partial, tuple(sorted((n, l.axes) for n, l in self.layouts.items())),
                operands, computed)


def evaluate(
    graph, mesh_shape: dict[str, int], hardware, train: bool, strategies: list[str] | None = None, roles=None
) -> list[Entry]:
    """The solver's plan and every baseline on ``mesh_shape``, each priced under ``hardware`` as a
    plan (``roles``: role -> the model's dim, see :mod:`meshjax.baselines`)."""
    from meshjax.baselines import BASELINES, applies, predict
    from meshjax.errors import InfeasibleError
    from meshjax.solve import solve

    wanted = strategies or ["solver", *(b for b in BASELINES if applies(b, graph, roles))]
    out = []
    for name in wanted:
        if name == "solver":
            try:
                plan = solve(graph, mesh_shape, hardware=hardware, train=train)
            except InfeasibleError as err:
                out.append(Entry("solver", mesh_shape, {}, None, [str(err)]))
                continue
            out.append(Entry("solver", mesh_shape, plan.layouts, plan))
            continue
        base = BASELINES[name](graph, mesh_shape, roles)
        plan, notes = predict(graph, mesh_shape, base.layouts, hardware, train)
        if base.partial:
            notes = ["activations: XLA propagation (predicted: solver's completion)", *notes]
        out.append(Entry(name, mesh_shape, base.layouts, plan, base.notes + notes, base.partial))
    return out


def evaluate_pipelined(model_spec: str, overrides: dict[str, Any], mesh_shape: dict[str, int], hardware, train: bool) -> Entry:
    """The solver's pipelined plan on a mesh with a ``stage`` axis (micro-batches, remat and
    in-stage layouts chosen)."""
    import meshjax as mj
    from meshjax.errors import InfeasibleError
    from meshjax.pipeline.plan import solve_pipelined

    def trace_for(sizes):
        model = load_model(model_spec, {**overrides, **sizes})
        return mj.trace(model.loss, model.params, *model.batch)

    try:
        plan = solve_pipelined(trace_for, mesh_shape, hardware=hardware, train=train)
    except (InfeasibleError, MeshjaxError) as err:
        return Entry("solver (pipelined)", mesh_shape, {}, None, [str(err)])
    pipe = plan.pipeline
    note = f"{pipe.stages} stages x {pipe.microbatches} micro-batches{', stage remat' if pipe.remat else ''}, bubble {pipe.bubble_fraction:.0%}"
    return Entry("solver (pipelined)", mesh_shape, plan.layouts, plan, [note])


def compile_entry(model, graph, entry: Entry, train: bool) -> None:
    """Compile ``entry``'s plan as ``verify`` does (the whole Adam step when training, every
    tensor and operand pinned; a partial baseline pins only its own layouts) and read the HLO."""
    import time

    from meshjax.devices import make_mesh
    from meshjax.hlo import inspect_compiled
    from meshjax.verify import compile_plan

    mesh = make_mesh(entry.mesh)
    start = time.perf_counter()
    pinned = entry.layouts if entry.partial else None
    compiled = compile_plan(entry.plan, model.loss, mesh, model.params, *model.batch, pinned=pinned)
    entry.compile_s = time.perf_counter() - start
    entry.report = inspect_compiled(compiled, mesh)


def compile_all(model, graph, entries: list[Entry], train: bool, console=None) -> None:
    """Compile every entry once per distinct layout, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    todo = [e for e in entries if e.plan is not None]
    done: dict[tuple, Entry] = {}
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("compiling", total=len(todo))
        for e in todo:
            progress.update(task, description=f"compiling {e.strategy} on {mesh_label(e.mesh)}")
            key = e.layout_key()
            if key in done:
                e.report, e.compile_s = done[key].report, done[key].compile_s
                e.notes.append(f"same layout as {done[key].strategy}")
            else:
                compile_entry(model, graph, e, train)
                done[key] = e
            progress.advance(task)


def entry_json(e: Entry, hardware) -> dict[str, Any]:
    row: dict[str, Any] = {"mesh": e.mesh, "strategy": e.strategy, "notes": e.notes}
    if e.plan is None:
        row.update(predicted=None, fits=False, compiled=None)
        return row
    row["predicted"] = {
        "step_time_s": e.plan.step_time_s,
        "comm_bytes": e.plan.comm_bytes,
        "peak_memory_bytes": e.plan.peak_memory_bytes,
    }
    row["fits"] = e.plan.peak_memory_bytes <= hardware.memory_bytes
    row["compiled"] = compiled_json(e.report) if e.report is not None else None
    return row


def table(entries: list[Entry], hardware, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col, justify in (("mesh", "left"), ("strategy", "left"), ("pred. step ms", "right"),
                         ("pred. mem/dev", "right"), ("pred. comm B", "right"),
                         ("compiled comm B", "right"), ("notes", "right")):
        t.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    footnotes: dict[str, int] = {}

    def refs(notes: list[str]) -> str:
        return ",".join(str(footnotes.setdefault(n, len(footnotes) + 1)) for n in notes)

    by_mesh: dict[str, list[Entry]] = {}
    for e in entries:
        by_mesh.setdefault(mesh_label(e.mesh), []).append(e)
    for label, group in by_mesh.items():
        priced = [e for e in group if e.plan is not None and e.plan.peak_memory_bytes <= hardware.memory_bytes]
        best = min((e.plan.step_time_s for e in priced), default=None)
        for i, e in enumerate(group):
            if e.plan is None:
                t.add_row(label if i == 0 else "", e.strategy, "-", "-", "-", "-", refs(e.notes))
                continue
            step = f"{e.plan.step_time_s * 1e3:.4f}"
            if best is not None and e.plan.step_time_s <= best * (1 + 1e-9):
                step = f"[bold green]{step}[/]"
            mem = e.plan.peak_memory_bytes
            mem_s = format_bytes(mem) + ("" if mem <= hardware.memory_bytes else " [red](too big)[/]")
            comp = f"{e.report.comm_bytes:,}" if e.report is not None else "-"
            t.add_row(label if i == 0 else "", e.strategy, step, mem_s, f"{e.plan.comm_bytes:,.0f}", comp,
                      refs(e.notes))
        t.add_section()
    t.caption = "\n".join(f"{i}: {n}" for n, i in footnotes.items()) or None
    t.caption_justify = "left"
    return t


def run(args: argparse.Namespace) -> int:
    from meshjax.cost.hardware import get_hardware

    n = args.devices
    if n < 1:
        raise MeshjaxError(f"--devices {n}: must be positive")
    meshes = parse_meshes(args.meshes, n) if args.meshes else mesh_shapes(n)
    hardware = get_hardware(args.hardware)
    overrides = parse_overrides(args.overrides)
    from meshjax import validate

    validate.writable_file(args.json_path, "--json")

    from meshjax.baselines import parse_roles

    roles = parse_roles(args.roles)
    if args.stage:
        from meshjax import models

        if args.model in models.PRESETS and hasattr(models.get(args.model)[1], "scan_layers"):
            overrides.setdefault("scan_layers", True)  # a pipeline splits a scan; same model either way
    strategies = None
    if args.strategies:
        known = ["solver", *_baseline_names()]
        strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
        for s in strategies:
            if s not in known:
                raise MeshjaxError(f"unknown strategy {s!r}; known: {', '.join(known)}")
    if args.verify is not False:
        setup_devices(n, None, f"--devices {n}")

    from meshjax import commands

    console = commands.console()
    model = load_model(args.model, overrides)
    graph = trace_model(model)
    n_params = sum(math.prod(t.shape) for t in graph.params)
    verify = args.verify if args.verify is not None else n_params <= SMALL_MODEL_PARAMS
    if args.verify is None and not verify:
        console.print(f"{n_params:,} params: predictions only (pass --verify to compile anyway)")

    entries: list[Entry] = []
    for shape in meshes:
        entries += evaluate(graph, shape, hardware, args.train, strategies, roles)
    if args.stage:
        for shape in stage_meshes(n):
            entries.append(evaluate_pipelined(args.model, overrides, shape, hardware, args.train))
    if verify:
        compile_all(model, graph, entries, args.train, console)

    title = (f"{model.name} on {n} devices, {hardware.name}, {'train' if args.train else 'inference'} "
             f"(green: fastest predicted on its mesh)")
    console.print(table(entries, hardware, title))
    feasible = [e for e in entries if e.plan is not None]
    if feasible:
        best = min(feasible, key=lambda e: e.plan.step_time_s)
        console.print(f"fastest predicted: {best.strategy} on {mesh_label(best.mesh)}, "
                      f"{best.plan.step_time_s * 1e3:.4f} ms/step")
    if args.json_path:
        doc = {
            "model": model.name,
            "devices": n,
            "hardware": hardware.name,
            "train": args.train,
            "verified": verify,
            "rows": [entry_json(e, hardware) for e in entries],
        }
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
        console.print(f"wrote {args.json_path}")
    return 0
