"""Byte-level text data: a small public-domain English corpus shipped with meshjax.

Tokens are bytes (vocab 256). :func:`batches` yields next-token ``(tokens, targets)`` numpy
batches of random windows; batch ``i`` depends only on ``(seed, i)``, so a run resumed at step
``i`` sees the same batches as one that never stopped.

Example::

    >>> data = tokens()
    >>> int(data.max()) < VOCAB
    True
    >>> tokens_, targets = next(batches(4, 16, seed=0))
    >>> tokens_.shape, targets.shape
    ((4, 16), (4, 16))
    >>> bool((tokens_[:, 1:] == targets[:, :-1]).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from importlib import resources

import numpy as np

from meshjax.errors import MeshjaxError

VOCAB = 256
"""Byte tokens: every model trained on this data needs ``vocab=256``."""


@lru_cache(maxsize=1)
def text() -> bytes:
    """The shipped corpus (``meshjax/data/text.txt``; sources in ``meshjax/data/README.md``)."""
    return resources.files("meshjax").joinpath("data", "text.txt").read_bytes()


def encode(s: str | bytes) -> np.ndarray:
    """UTF-8 bytes as int32 tokens."""
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)


def decode(tokens) -> str:
    """Tokens back to text (invalid UTF-8 is replaced)."""
    return bytes(np.asarray(tokens, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


def tokens() -> np.ndarray:
    """The whole corpus as int32 byte tokens."""
    return encode(text())


def batch_at(step: int, batch: int, seq: int, *, seed: int = 0, data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batch number ``step``: ``(tokens, targets)``, int32 ``(batch, seq)``, where ``targets`` are
    ``tokens`` shifted by one. Windows start at random offsets drawn from ``(seed, step)``."""
    stream = tokens() if data is None else np.asarray(data)
    if batch < 1 or seq < 1:
        raise MeshjaxError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if len(stream) < seq + 1:
        raise MeshjaxError(f"the text has {len(stream)} tokens; a window of seq={seq} needs {seq + 1}")
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, len(stream) - seq, size=batch)
    windows = np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def batches(
    batch: int, seq: int, *, seed: int = 0, start: int = 0, steps: int | None = None, data: np.ndarray | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Host numpy ``(tokens, targets)`` batches for steps ``start, start + 1, ...`` (``steps`` of
    them, or forever), deterministic in ``seed``."""
    step = start
    while steps is None or step < start + steps:
        yield batch_at(step, batch, seq, seed=seed, data=data)
        step += 1


__all__ = ["VOCAB", "text", "encode", "decode", "tokens", "batch_at", "batches"]
