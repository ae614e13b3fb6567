"""Optimizers as the memory model and the training step both see them.

An :class:`Optimizer` is a typed value: which update rule (``adam``, ``sgd``, ``adafactor``), the
dtype its state is kept in, and whether low-precision params get a float32 master copy. The solver
reads the bytes each param's state takes (:meth:`Optimizer.state_bytes`); the training step
builds the update from the same value (:meth:`Optimizer.transform`, :meth:`Optimizer.keeps_master`),
so the two cannot disagree.

Mixed precision as Megatron-LM and MaxText run it: params (and so activations and gradients) in
bfloat16 or float16, a float32 master copy of every such param, and float32 optimizer state. The
update runs on the master copy; the params are the master cast down. Per param element that is,
with Adam: 2 (bf16 param) + 2 (bf16 gradient) + 4 (master) + 8 (two fp32 moments) = 16 bytes.

Example::

    >>> adam = get_optimizer("adam")
    >>> adam.state_bytes(4096, "bfloat16")          # fp32 master + two fp32 moments
    (49152, 0)
    >>> get_optimizer("sgd").state_bytes(4096, "float32")
    (0, 0)
    >>> get_optimizer("adafactor").state_bytes(4096, "float32", shape=(256, 16))   # unfactored: dims < 128
    (16384, 0)
    >>> get_optimizer("adafactor").state_bytes(256 * 512, "float32", shape=(256, 512))  # one row and one column
    (0, 3072)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from meshjax.dtypes import is_floating, itemsize
from meshjax.errors import MeshjaxError

OPTIMIZERS = ("adam", "sgd", "adafactor")
# optax.adafactor factors the second moment of a param whose two largest dims are at least this.
ADAFACTOR_MIN_DIM = 128


@dataclass(frozen=True)
class Optimizer:
    """An update rule and how its state is stored.

    - ``name``: ``"adam"`` (two moments per element), ``"sgd"`` (no state) or ``"adafactor"``
      (a factored second moment: one row and one column of statistics per matrix);
    - ``learning_rate``;
    - ``state_dtype``: the dtype of the moments (float32 by default whatever the params' dtype);
    - ``master_weights``: keep a float32 master copy of params stored in a narrower float type.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    state_dtype: str = "float32"
    master_weights: bool = True

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise MeshjaxError(f"unknown optimizer {self.name!r}; known: {', '.join(OPTIMIZERS)}")
        if not is_floating(self.state_dtype):
            raise MeshjaxError(f"optimizer state dtype {self.state_dtype!r} is not a floating dtype")

    def keeps_master(self, dtype: str) -> bool:
        """Whether a param of ``dtype`` gets a float32 master copy."""
        return self.master_weights and is_floating(dtype) and itemsize(dtype) < 4

    def state_bytes(self, size: int, dtype: str, shape: tuple[int, ...] | None = None) -> tuple[float, float]:
        """Bytes of optimizer state (master copy included) for a param of ``size`` elements:
        ``(sharded, replicated)``. The first is laid out like the param's state (it mirrors the
        param); the second (adafactor's row and column statistics) is replicated."""
        master = 4 * size if self.keeps_master(dtype) else 0
        moment = itemsize(self.state_dtype)
        if self.name == "adam":
            return master + 2 * moment * size, 0
        if self.name == "sgd":
            return master, 0
        dims = sorted(shape or (size,))
        if len(dims) >= 2 and dims[-2] >= ADAFACTOR_MIN_DIM:
            rest = size // (dims[-1] * dims[-2])
            # One row and one column of second-moment statistics per matrix.
            return master, moment * rest * (dims[-1] + dims[-2])
        return master + moment * size, 0

    def transform(self) -> Any:
        """The optax transformation of the update rule. The training step feeds it gradients cast
        to ``state_dtype`` (so its moments are kept in that dtype) and applies it to the master
        copy where there is one (:mod:`meshjax.train`)."""
        import jax.numpy as jnp
        import optax

        if self.name == "adam":
            return optax.adam(self.learning_rate, mu_dtype=jnp.dtype(self.state_dtype))
        if self.name == "sgd":
            return optax.sgd(self.learning_rate)
        return optax.adafactor(self.learning_rate, min_dim_size_to_factor=ADAFACTOR_MIN_DIM)

    def __str__(self) -> str:
        extra = "" if self.name == "sgd" else f", {self.state_dtype} state"
        return f"{self.name}{extra}{', fp32 master weights' if self.master_weights else ''}"


ADAM = Optimizer()


def get_optimizer(spec: str | Optimizer | None) -> Optimizer:
    """An :class:`Optimizer` from its name (``"adam"``, ``"sgd"``, ``"adafactor"``) or itself;
    ``None`` is Adam."""
    if spec is None:
        return ADAM
    if isinstance(spec, Optimizer):
        return spec
    if isinstance(spec, str):
        return Optimizer(spec.strip().lower())
    raise MeshjaxError(f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or a meshjax.optimizer.Optimizer, got {spec!r}")


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
