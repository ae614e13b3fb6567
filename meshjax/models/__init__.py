"""Small functional models over named dims, and a registry of their presets.

Every model module has ``Config`` (a frozen dataclass), ``PRESETS`` (name -> Config),
``sizes(config)``, ``decls(config)``, ``init(config, key)``, ``abstract_params(config)``,
``loss(params, *batch)``, ``forward``, ``example_batch(config, key)`` and
``abstract_batch(config)`` (a tuple: call ``loss(params, *batch)``).

Example::

    >>> from meshjax import models
    >>> module, config = models.get("gpt-tiny")
    >>> module.__name__, config.layers
    ('meshjax.models.transformer', 2)
    >>> ex = models.example("gpt3-175b", abstract=True)      # nothing allocated
    >>> ex.params["unembed"].shape
    (12288, 50304)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from difflib import get_close_matches
from types import ModuleType
from typing import Any, Callable

import jax

from meshjax import validate
from meshjax.errors import MeshjaxError
from meshjax.models import block, llama, mlp, moe, transformer

MODULES: dict[str, ModuleType] = {"mlp": mlp, "transformer": transformer, "block": block, "llama": llama, "moe": moe}

_REGISTRY: dict[str, tuple[ModuleType, Any]] = {
    name: (module, config) for module in MODULES.values() for name, config in module.PRESETS.items()
}

PRESETS: tuple[str, ...] = tuple(_REGISTRY)
"""Every preset name, e.g. ``"mlp-tiny"``, ``"gpt-tiny"``, ``"gpt3-175b"``, ``"block-tiny"``."""


class UnknownModelError(MeshjaxError, KeyError):
    """A preset name that is not registered (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def get(name: str, **overrides: Any) -> tuple[ModuleType, Any]:
    """``(module, config)`` of preset ``name``; keyword ``overrides`` replace config fields
    (``get("gpt-tiny", scan_layers=True)``), checked and typed by :func:`meshjax.validate.config_overrides`
    (strings as typed on the command line are accepted: ``get("gpt-tiny", batch="16")``)."""
    try:
        module, config = _REGISTRY[name]
    except KeyError:
        close = get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; known models: {', '.join(PRESETS)}") from None
    if overrides:
        # Typed by each field: "16" -> 16, "no" -> False; sizes > 0, dtypes from validate.DTYPES.
        config = dataclasses.replace(config, **validate.config_overrides(name, config, overrides))
    return module, config


@dataclass(frozen=True)
class Example:
    """A model ready to trace or run: ``loss(params, *batch)``."""

    name: str
    module: ModuleType
    config: Any
    loss: Callable[..., Any]
    params: Any
    batch: tuple

    @property
    def sizes(self) -> dict[str, int]:
        return self.module.sizes(self.config)


def example(name: str, key: jax.Array | int = 0, *, abstract: bool = False, **overrides: Any) -> Example:
    """Params and a batch for preset ``name``: concrete (seeded by ``key``, a JAX key or an int)
    or ``abstract`` (``jax.ShapeDtypeStruct`` values, for paper-size presets)."""
    module, config = get(name, **overrides)
    if abstract:
        params, batch = module.abstract_params(config), module.abstract_batch(config)
    else:
        params, batch = module.init(config, key), module.example_batch(config, key)
    # A model whose loss depends on its config (MoE routing) builds it from the config.
    loss = module.make_loss(config) if hasattr(module, "make_loss") else module.loss
    return Example(name, module, config, loss, params, tuple(batch))


__all__ = ["MODULES", "PRESETS", "Example", "UnknownModelError", "example", "get", "block", "llama", "mlp", "moe", "transformer"]
