"""The cost model: hardware profiles, collective costs, per-op strategies and their costs."""

from meshjax.cost.collectives import Collective, collective_time
from meshjax.cost.hardware import PROFILES, Hardware, Link, get_hardware
from meshjax.cost.strategies import Strategy, enumerate_layouts, op_strategies, reshard

__all__ = [
    "Collective", "collective_time", "PROFILES", "Hardware", "Link", "get_hardware",
    "Strategy", "enumerate_layouts", "op_strategies", "reshard",
]
