"""Reading compiled XLA programs: HLO text (:mod:`~meshjax.hlo.text`), replica groups
(:mod:`~meshjax.hlo.groups`), loop trip counts (:mod:`~meshjax.hlo.loops`), op-name metadata
(:mod:`~meshjax.hlo.metadata`), and the report of collectives, memory and flops
(:mod:`~meshjax.hlo.report`) that ``verify`` compares with a plan.

``meshjax.inspect`` is the same package under its former name.
"""

from meshjax.hlo.groups import parse_replica_groups, replica_groups_to_axes
from meshjax.hlo.report import Collective, CompiledReport, inspect_compiled, parse_collectives
from meshjax.hlo.text import shape_bytes

__all__ = [
    "Collective",
    "CompiledReport",
    "inspect_compiled",
    "parse_collectives",
    "parse_replica_groups",
    "replica_groups_to_axes",
    "shape_bytes",
]
