"""The ``op_name`` metadata XLA attaches to each HLO instruction, and the grammar of its
combined form: lowering runs every named op under a ``jax.named_scope`` of its name, so a
collective's metadata names the op it came from.

>>> op_name_of('metadata={op_name="jit(f)/block_0/mlp/out/dot_general" source_line=3}')
'jit(f)/block_0/mlp/out/dot_general'
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def op_name_of(attrs: str) -> str:
    """The ``op_name`` in an instruction's attribute text, or ``""``."""
    match = re.search(r'op_name="((?:[^"\\]|\\.)*)"', attrs)
    return match.group(1) if match else ""


def expand_op_names(text: str) -> list[str]:
    """The op_name paths one HLO metadata string stands for. XLA writes a combined op's names
    with their common prefix once: ``p/(a:b:c)`` is ``p/a``, ``p/b`` and ``p/c``.

    >>> expand_op_names("jit(f)/jvp(x/(q))/dot:k))/dot)")
    ['jit(f)/jvp(x/q))/dot', 'jit(f)/jvp(x/k))/dot']
    """
    first = text.find(":")
    if first < 0:
        return [text]
    opener = max((i for i in range(first) if text[i] == "(" and i > 0 and text[i - 1] == "/"), default=-1)
    if opener < 0 or not text.endswith(")"):
        return [text]
    prefix, alternatives = text[:opener], text[opener + 1 : -1].split(":")
    return [prefix + alt for alt in alternatives]


def ops_named(text: str, names: Sequence[str]) -> list[str]:
    """The op names (from ``names``) a collective's ``op_name`` metadata mentions, in order.

    >>> ops_named("jit(step)/transpose(jvp(block_0/mlp/out))/dot_general", ["block_0/mlp/out"])
    ['block_0/mlp/out']
    """
    found: list[str] = []
    by_length = sorted(names, key=len, reverse=True)
    for path in expand_op_names(text):
        for name in by_length:  # the longest match: "a/b_1" before "a/b"
            at = path.find(name)
            while at >= 0:
                before = path[at - 1] if at > 0 else "/"
                after = path[at + len(name)] if at + len(name) < len(path) else "/"
                if before in "(/" and after in ")/":
                    break
                at = path.find(name, at + 1)
            if at >= 0:
                if name not in found:
                    found.append(name)
                break
    return found
