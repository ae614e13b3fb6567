"""One instance of an unrolled repeated block: ``x = repeated("block_0", block, params, x)``.

It runs ``fn(*args)`` under the scope ``name`` (as ``with scope(name): fn(*args)`` would), and
when the plan being lowered rematerialises the block, under ``jax.checkpoint`` with the policy
the plan chose (:mod:`meshjax.cost.remat`), so the backward pass recomputes what the policy
does not keep. Scanned blocks need nothing: :func:`meshjax.scan` checkpoints its body.

Example (a decoder's unrolled layers; the model zoo's decoders are written this way)::

    for key in ("block_0", "block_1"):
        x = repeated(key, block, params[key], x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from meshjax import context


def repeated(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under scope ``name``, checkpointed when the lowered plan says so."""
    ctx = context.current()
    prefix = "/".join([*(ctx.scopes if ctx else []), name]) + "/"
    policy = ctx.remat_policy(prefix) if hasattr(ctx, "remat_policy") else None
    with context.scope(name):
        if policy is None:
            return fn(*args)

        # A fresh function per instance: jax.checkpoint caches traces by function, and a cached
        # trace would carry another instance's tensor names (which its policy does not save).
        def instance(*values: Any) -> Any:
            return fn(*values)

        return jax.checkpoint(instance, policy=policy)(*args)
