"""Checks of what users pass, made before any work starts. The CLI and the Python API call the
same functions, so a mistake gets the same one-line :class:`~meshjax.errors.MeshjaxError`
whichever way it came in: the value, what is wrong with it, and what would be right.

Example::

    >>> mesh_shape({"data": 4, "model": 2})
    {'data': 4, 'model': 2}
    >>> mesh_shape({"data": 0})
    Traceback (most recent call last):
    ...
    meshjax.errors.LayoutError: mesh {'data': 0}: axis 'data' has size 0; sizes must be positive integers
    >>> memory_budget("16GB")
    16000000000.0
    >>> config_value("gpt-tiny", "scan_layers", "no", False)
    False
    >>> config_value("gpt-tiny", "seq", "2.5", 16)
    Traceback (most recent call last):
    ...
    meshjax.errors.MeshjaxError: model 'gpt-tiny': seq=2.5: expected a positive integer
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from typing import Any

from meshjax import devices
from meshjax.errors import LayoutError, MeshjaxError

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The dtypes a model config may name. float64 needs ``jax_enable_x64``, which meshjax does not
turn on: JAX would silently compute in float32, so it is refused rather than mispriced."""

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def did_you_mean(name: str, known: Sequence[str], what: str = "") -> str:
    """``" (did you mean model?)"`` when a close match exists, else the known names."""
    close = get_close_matches(name, list(known), n=3)
    if close:
        return f" (did you mean {', '.join(close)}?)"
    return f" ({what or 'known'}: {', '.join(known)})" if known else ""


# --- meshes ----------------------------------------------------------------------------------


def axis_names(text: str | None, flag: str = "--axes") -> list[str] | None:
    """``"data,model"`` -> ``["data", "model"]``; names must be identifiers and unique."""
    if text is None:
        return None
    names = [a.strip() for a in text.split(",")]
    for name in names:
        if not name.isidentifier():
            raise LayoutError(f"{flag} {text!r}: {name!r} is not an axis name (letters, digits, _)")
    _unique_axes(names, f"{flag} {text!r}")
    return names


def _unique_axes(names: Sequence[str], where: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise LayoutError(f"{where}: mesh axis {name!r} appears twice; each axis needs its own name")
        seen.add(name)


def mesh_shape(mesh: Any) -> dict[str, int]:
    """A mesh (``jax.sharding.Mesh``) or ``{axis: size}`` mapping as a checked dict: names
    unique strings, sizes positive integers."""
    from jax.sharding import Mesh

    if isinstance(mesh, Mesh):
        return devices.mesh_shape(mesh)
    if isinstance(mesh, str):
        raise LayoutError(
            f"mesh {mesh!r}: pass a dict like {{'data': 4, 'model': 2}} or a jax Mesh "
            f"(meshjax.devices.parse_mesh_shape({mesh!r}) reads the CLI form)"
        )
    if isinstance(mesh, Sequence) and all(isinstance(p, Sequence) and len(p) == 2 for p in mesh):
        _unique_axes([p[0] for p in mesh], f"mesh {list(mesh)}")
        mesh = dict(mesh)
    if not isinstance(mesh, Mapping):
        raise LayoutError(f"mesh {mesh!r}: expected a dict of axis name -> size or a jax Mesh")
    if not mesh:
        raise LayoutError("mesh {}: needs at least one axis")
    out = {}
    for name, size in mesh.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise LayoutError(f"mesh {dict(mesh)}: axis name {name!r} is not a string identifier")
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise LayoutError(f"mesh {dict(mesh)}: axis {name!r} has size {size!r}; sizes must be positive integers")
        if int(size) < 1:
            raise LayoutError(f"mesh {dict(mesh)}: axis {name!r} has size {size}; sizes must be positive integers")
        out[name] = int(size)
    return out


# --- sizes and numbers -----------------------------------------------------------------------


def memory_budget(value: Any, what: str = "memory budget", hardware: Any = None) -> float | None:
    """Bytes per device from a number or a size with a unit (``"16GB"``, ``"16GiB"``); ``None``
    or ``"none"``: no budget; ``"device"``: ``hardware``'s usable memory. Must be positive and
    finite."""
    from meshjax.units import parse_bytes

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "none":
            return None
        if text.lower() == "device":
            if hardware is None:
                raise MeshjaxError(f"{what} 'device': needs a hardware profile")
            return float(hardware.usable_memory_bytes)
        if text.startswith("-"):
            raise MeshjaxError(f"{what} {value!r}: must be a positive size like 16GiB, 80GB or 8e10")
        return positive_number(parse_bytes(text, what=what), what, shown=value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MeshjaxError(f"{what} {value!r}: give bytes per device (> 0), a size like '16GB', 'device' or None")
    return positive_number(float(value), what)


def positive_number(value: float, what: str, *, shown: Any = None) -> float:
    if not math.isfinite(value) or value <= 0:
        raise MeshjaxError(f"{what} {shown if shown is not None else value!r}: must be a positive, finite number")
    return value


def count(value: int, flag: str, minimum: int = 1) -> int:
    """An integer argument such as ``--top`` or ``--steps`` of at least ``minimum``."""
    if value < minimum:
        raise MeshjaxError(f"{flag} {value}: must be {'positive' if minimum == 1 else f'>= {minimum}'}")
    return value


# --- model config overrides (--set) ----------------------------------------------------------


def parse_set(text: str | None, flag: str = "--set") -> dict[str, str]:
    """``"batch=8,seq=128"`` -> ``{"batch": "8", "seq": "128"}`` (strings: typed later by the
    config field they set, see :func:`config_value`)."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier() or not value:
            raise MeshjaxError(f"{flag} {text!r}: {item.strip()!r} is not of the form key=value")
        if key in out:
            raise MeshjaxError(f"{flag} {text!r}: {key!r} is set twice")
        out[key] = value
    return out


def config_value(model: str, field: str, value: Any, default: Any) -> Any:
    """``value`` for config field ``field`` whose default is ``default``, typed like it: bools
    from true/false/1/0/yes/no only, ints whole and positive, floats finite, ``dtype`` from
    :data:`DTYPES`. ``value`` may be the string the user typed or a Python value."""
    where = f"model {model!r}: {field}={value}"
    if field == "dtype":
        name = value if isinstance(value, str) else getattr(value, "name", getattr(value, "__name__", str(value)))
        if name == "float64":
            raise MeshjaxError(f"{where}: float64 is not supported (JAX computes in float32 unless x64 is on); "
                               f"use one of {', '.join(DTYPES)}")
        if name not in DTYPES:
            raise MeshjaxError(f"{where}: unknown dtype{did_you_mean(name, DTYPES, 'dtypes')}")
        return name
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
        raise MeshjaxError(f"{where}: expected true or false (also 1/0, yes/no)")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise MeshjaxError(f"{where}: expected a positive integer")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise MeshjaxError(f"{where}: expected a positive integer") from None
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, numbers.Integral):
            raise MeshjaxError(f"{where}: expected a positive integer")
        if value < 1:
            raise MeshjaxError(f"{where}: expected a positive integer")
        return int(value)
    if isinstance(default, float):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise MeshjaxError(f"{where}: expected a number") from None
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise MeshjaxError(f"{where}: expected a finite number >= 0")
        return number
    if isinstance(value, str) and default is None:
        return _guess(value)
    return value


def _guess(text: str) -> Any:
    """A ``--set`` value for a field without a default to type it by."""
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def config_overrides(model: str, config: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` for a dataclass ``config``, each typed and checked against its field."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    out = {}
    for key, value in overrides.items():
        if key not in fields:
            raise MeshjaxError(f"model {model!r} has no config field {key!r}{did_you_mean(key, sorted(fields), 'fields')}")
        out[key] = config_value(model, key, value, fields[key])
    return out


def callable_overrides(model: str, fn: Any, overrides: Mapping[str, str]) -> dict[str, Any]:
    """``--set`` strings for a user's ``file.py:callable``, typed by its keyword defaults."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    out = {}
    for key, value in overrides.items():
        if key not in params and not takes_any:
            named = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
            raise MeshjaxError(f"model {model!r} takes no argument {key!r}{did_you_mean(key, named, 'arguments')}")
        default = params[key].default if key in params else None
        default = None if default is inspect.Parameter.empty else default
        out[key] = config_value(model, key, value, default) if isinstance(value, str) else value
    return out


# --- rules and pins against a graph ----------------------------------------------------------


def rules(parsed: Mapping[str, tuple[str, ...]], graph: Any, mesh: Mapping[str, int]) -> None:
    """Every rule names a dim of the graph and existing mesh axes, each axis once, and the
    axes divide the dim wherever it occurs."""
    for dim, axes in parsed.items():
        if dim not in graph.dim_names:
            raise LayoutError(f"rule for dim {dim!r}: no tensor has that dim{did_you_mean(dim, sorted(graph.dim_names), 'dims')}")
        _axes(f"rule {dim}:{'+'.join(axes) or 'none'}", axes, mesh)
        factor = math.prod(mesh[a] for a in axes)
        for tensor in graph.tensors.values():
            if dim in tensor.dims:
                size = tensor.shape[tensor.dims.index(dim)]
                if size % factor:
                    raise LayoutError(
                        f"rule {dim}:{'+'.join(axes)}: dim {dim!r} has size {size} (tensor {tensor.name!r}), "
                        f"which does not divide over {_axes_text(axes, mesh)}"
                    )


def pins(pinned: Mapping[str, Any], graph: Any, mesh: Mapping[str, int]) -> None:
    """Every pin names a tensor of the graph and a layout it can take on ``mesh``."""
    for name, layout in pinned.items():
        tensor = graph.tensors[name]
        seen: dict[str, str] = {}
        for dim, size, axes in zip(tensor.dims, tensor.shape, layout.axes):
            _axes(f"pin of {name!r}, dim {dim!r}", axes, mesh)
            for axis in axes:
                if axis in seen:
                    raise LayoutError(f"pin of {name!r}: mesh axis {axis!r} splits both dim {seen[axis]!r} and dim {dim!r}")
                seen[axis] = dim
            factor = math.prod(mesh[a] for a in axes)
            if size % factor:
                raise LayoutError(
                    f"pin of {name!r}: dim {dim!r} has size {size}, which does not divide over {_axes_text(axes, mesh)}"
                )


def _axes(where: str, axes: Sequence[str], mesh: Mapping[str, int]) -> None:
    seen = set()
    for axis in axes:
        if axis not in mesh:
            raise LayoutError(f"{where}: unknown mesh axis {axis!r}{did_you_mean(axis, list(mesh), 'mesh axes')}")
        if axis in seen:
            raise LayoutError(f"{where}: mesh axis {axis!r} is used twice")
        seen.add(axis)


def _axes_text(axes: Sequence[str], mesh: Mapping[str, int]) -> str:
    parts = [f"{a}={mesh[a]}" for a in axes]
    return parts[0] if len(parts) == 1 else f"{'+'.join(parts)} ({math.prod(mesh[a] for a in axes)} ways)"


def scalar_loss(graph: Any) -> None:
    """A training plan needs a function that returns one scalar."""
    outputs = graph.outputs
    if len(outputs) != 1 or graph.tensors[outputs[0]].dims != ():
        got = ", ".join(f"{n!r} with dims {' '.join(graph.tensors[n].dims) or '()'}" for n in outputs)
        raise MeshjaxError(f"a training plan needs a loss that returns one scalar; the function returns {got}")


# --- arrays against the plan they are run under ----------------------------------------------


def arrays_match(graph: Any, names: Sequence[str], leaves: Sequence[Any], microbatches: int = 1) -> None:
    """Every leaf has the shape the graph (and so the plan) was traced with; with
    ``microbatches``, the graph is one micro-batch and inputs hold the whole batch."""
    from meshjax.microbatch import global_shape

    for name, leaf in zip(names, leaves):
        tensor = graph.tensors.get(name)
        if tensor is None:
            continue
        shape = tuple(getattr(leaf, "shape", ()))
        want = global_shape(tensor, microbatches) if tensor.role == "input" else tuple(tensor.shape)
        if shape != want:
            dims = " ".join(tensor.dims)
            raise MeshjaxError(
                f"{tensor.role} {name!r} has shape {shape}; the plan was made for {want} "
                f"({dims}): solve again for these sizes"
            )


# --- files -----------------------------------------------------------------------------------


def writable_file(path: str | None, flag: str) -> None:
    """``path`` can be created or overwritten: its folder exists and is writable, and it is not
    a folder itself."""
    if path is None:
        return
    if os.path.isdir(path):
        raise MeshjaxError(f"{flag} {path!r}: is a directory, expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MeshjaxError(f"{flag} {path!r}: directory {folder!r} does not exist")
    if os.path.exists(path) and not os.access(path, os.W_OK) or not os.access(folder, os.W_OK):
        raise MeshjaxError(f"{flag} {path!r}: not writable")


def writable_dir(path: str | None, flag: str) -> None:
    """``path`` is a writable folder or can be created as one."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise MeshjaxError(f"{flag} {path!r}: exists and is not a directory")
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise MeshjaxError(f"{flag} {path!r}: cannot create or write in {probe!r}")


__all__ = [
    "DTYPES", "axis_names", "mesh_shape", "memory_budget", "count", "parse_set", "config_value",
    "config_overrides", "callable_overrides", "rules", "pins", "scalar_loss", "arrays_match",
    "writable_file", "writable_dir", "did_you_mean",
]
