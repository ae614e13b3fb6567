"""``meshjax plan``: solve a layout for a model preset and check it against XLA.

Example::

    $ meshjax plan                                   # gpt-tiny, 4x2 (data, model), train, verified
    $ meshjax plan gpt3-175b --mesh 8x8 --hardware h100-2node --memory-limit 80GB --no-verify
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from meshjax.units import parse_bytes


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="solve a layout for a model preset and (optionally) check it against XLA")
    plan.add_argument("model", nargs="?", default="gpt-tiny", help="model preset (default: gpt-tiny)")
    plan.add_argument("--mesh", default="4x2", help="mesh sizes, e.g. 8, 4x2, 2x2x2 (default: 4x2)")
    plan.add_argument("--axes", default=None, help="comma-separated mesh axis names (default: data,model for 2D)")
    plan.add_argument("--train", dest="train", action="store_true", default=True, help="plan a training step (default)")
    plan.add_argument("--inference", dest="train", action="store_false", help="plan the forward pass only")
    plan.add_argument("--hardware", default="cpu-sim", help="hardware profile (default: cpu-sim)")
    plan.add_argument("--rules", default=None, help='dim rules, e.g. "batch:data;seq:none"')
    plan.add_argument("--memory-limit", default=None, help="per-device memory budget, e.g. 16GiB")
    plan.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the plan as JSON")
    plan.add_argument("--verify", dest="verify", action="store_true", default=None,
                      help="compile on simulated CPU devices and compare with XLA (default: on)")
    plan.add_argument("--no-verify", dest="verify", action="store_false", help="skip compiling")
    plan.add_argument("--top", type=int, default=20, help="rows of the cost table (default: 20)")


def run(args: argparse.Namespace) -> int:
    # Parse the mesh and configure simulated devices before anything starts a JAX backend.
    from meshjax.devices import parse_mesh_shape, use_cpu_devices

    axes = [a.strip() for a in args.axes.split(",")] if args.axes else None
    mesh_shape = parse_mesh_shape(args.mesh, axes)
    budget = parse_bytes(args.memory_limit) if args.memory_limit else None
    verify = True if args.verify is None else args.verify
    if verify:
        use_cpu_devices(math.prod(mesh_shape.values()))

    from rich.console import Console

    import meshjax as mj
    from meshjax import models
    from meshjax.plan import solve

    console = Console()
    example = models.example(args.model, abstract=True)
    graph = mj.trace(example.loss, example.params, *example.batch)
    plan = solve(graph, mesh_shape, hardware=args.hardware, train=args.train, rules=args.rules, memory_budget=budget)
    console.print(plan.table())
    console.print(plan.cost_table(top=args.top))
    console.print(plan.summary())

    out: dict[str, Any] = {"model": args.model, **plan.to_json()}
    if verify:
        from meshjax.devices import make_mesh
        from meshjax.inspect import inspect_compiled

        mesh = make_mesh(mesh_shape)
        compiled = plan.program(example.loss, mesh).compile(example.params, *example.batch, grad=args.train)
        report = inspect_compiled(compiled, mesh)
        console.print(report.table())
        # The compiled program is loss + grads: it holds no optimizer state, so leave that out.
        predicted_mem = plan.peak_memory_bytes - plan.memory_breakdown().get("optimizer_state", 0.0)
        compiled_mem = report.memory.get("peak_bytes")
        console.print(f"comm bytes/step: predicted {plan.comm_bytes:,.0f}, compiled {report.comm_bytes:,}")
        console.print(
            f"memory/device:   predicted {predicted_mem:,.0f}, compiled "
            + (f"{compiled_mem:,} (arguments + outputs + temporaries - aliased)" if compiled_mem is not None else "n/a")
        )
        out["compiled"] = {"comm_bytes": report.comm_bytes, "by_kind": report.by_kind(), "memory": report.memory}
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=2)
        console.print(f"wrote {args.json_path}")
    return 0
