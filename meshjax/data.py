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

from collections.abc import Iterator, Sequence
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


# --- per-process batches: each process builds only the rows its devices hold ---------------------


def process_block(sharding, shape: Sequence[int]) -> tuple[slice, ...]:
    """The smallest box of a global array of ``shape`` that holds every shard this process's
    devices need under ``sharding``: the only part of the array the process has to build."""
    shape = tuple(int(s) for s in shape)
    lo, hi = list(shape), [0] * len(shape)
    for index in sharding.addressable_devices_indices_map(shape).values():
        for i, (s, n) in enumerate(zip(index, shape)):
            start, stop, _ = s.indices(n) if isinstance(s, slice) else (s, s + 1, 1)
            lo[i], hi[i] = min(lo[i], start), max(hi[i], stop)
    return tuple(slice(a, max(a, b)) for a, b in zip(lo, hi))


def local_index(index: Sequence[slice], block: Sequence[slice], shape: Sequence[int]) -> tuple[slice, ...]:
    """``index`` (a device's slice of the global array) relative to ``block``."""
    out = []
    for s, b, n in zip(index, block, shape):
        start, stop, _ = s.indices(n)
        out.append(slice(start - b.start, stop - b.start))
    return tuple(out)


def batch_rows(step: int, batch: int, seq: int, rows: slice, *, seed: int = 0, data: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of :func:`meshjax.data.batch_at` ``(step, batch, seq, seed)``, building only
    those windows (the same random offsets, drawn for the whole batch)."""
    stream = tokens() if data is None else np.asarray(data)
    if batch < 1 or seq < 1:
        raise MeshjaxError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    if len(stream) < seq + 1:
        raise MeshjaxError(f"the text has {len(stream)} tokens; a window of seq={seq} needs {seq + 1}")
    rng = np.random.default_rng([int(seed), int(step)])  # as data.batch_at
    starts = rng.integers(0, len(stream) - seq, size=batch)[rows]
    windows = np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32).reshape(len(starts), seq + 1)
    return windows[:, :-1], windows[:, 1:]


class BlockFetch:
    """A batch leaf for :func:`meshjax.train.shard_batch` that builds only part of the global
    array: ``fetch(block)`` returns ``global[block]`` for a tuple of slices."""

    def __init__(self, fetch, shape: Sequence[int]):
        self.fetch = fetch
        self.shape = tuple(int(s) for s in shape)

    def __call__(self, block: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.fetch(block))


def lm_batch(step: int, batch: int, seq: int, *, seed: int = 0) -> tuple[BlockFetch, BlockFetch]:
    """``(tokens, targets)`` of :func:`meshjax.data.batch_at` as :class:`BlockFetch` leaves: each
    process builds only the windows of the rows its devices hold."""
    cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def part(which: int):
        def fetch(block: tuple[slice, ...]) -> np.ndarray:
            rows = block[0].indices(batch)[:2]
            if rows not in cache:
                cache[rows] = batch_rows(step, batch, seq, slice(*rows), seed=seed)
            return cache[rows][which][(slice(None), *block[1:])]

        return BlockFetch(fetch, (batch, seq))

    return part(0), part(1)


__all__ = [
    "VOCAB", "BlockFetch", "batch_at", "batch_rows", "batches", "decode", "encode", "lm_batch", "local_index",
    "process_block", "text", "tokens",
]
