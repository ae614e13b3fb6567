"""HLO text as data: element sizes, shapes, and a module's computations and instructions.

>>> shape_bytes("(f32[8,4]{1,0}, bf16[16])")
160
>>> hlo = "ENTRY %main (p: f32[4]) -> f32[4] {\\n  ROOT %n = f32[4]{0} negate(f32[4]{0} %p)\\n}"
>>> comps = parse_module(hlo)
>>> [(i.name, i.opcode, i.operands) for i in comps["main"].instrs]
[('n', 'negate', ['p'])]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Attributes whose value names a single called computation.
_CALL_ATTRS = ("body", "condition", "to_apply", "calls", "true_computation", "false_computation")
# Attributes whose value is a {%a, %b} list of called computations.
_CALL_LIST_ATTRS = ("branch_computations", "called_computations")

_DTYPE_BITS: dict[str, int] = {
    "pred": 8, "s8": 8, "u8": 8,
    "bf16": 16, "f16": 16, "s16": 16, "u16": 16,
    "f32": 32, "s32": 32, "u32": 32,
    "f64": 64, "s64": 64, "u64": 64, "c64": 64,
    "c128": 128,
    "s4": 4, "u4": 4, "s2": 2, "u2": 2, "s1": 1, "u1": 1,
    "token": 0,
}  # fmt: skip
_ARRAY_RE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")


def _dtype_bits(dtype: str) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    match = re.match(r"f(\d+)", dtype)  # f8e4m3fn, f8e5m2, f4e2m1fn, f6e3m2fn, ...
    if match:
        return int(match.group(1))
    raise ValueError(f"unknown HLO element type {dtype!r}")


def _array_bytes(dtype: str, dims: str) -> int:
    # "<=8" is a bounded dynamic dim (counted at its bound); "?" is unbounded (counted as 0).
    sizes = [int(re.sub(r"\D", "", d) or 0) for d in dims.split(",") if d.strip()]
    return math.ceil(math.prod(sizes) * _dtype_bits(dtype) / 8)


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples sum their elements. Layouts are ignored."""
    shape = re.sub(r"\{[^{}]*\}", "", shape)  # drop layouts, which may contain T(8,128)
    return sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY_RE.findall(shape))


def matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack: list[str] = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in {text[start:start + 80]!r}")


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


def tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape, or ``[shape]`` for an array shape."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    return split_top_level(shape[1 : matching(shape, 0) - 1])



@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    operand_text: str
    attrs: str  # text after the operand list (raw, including quoted strings)


@dataclass
class Computation:
    name: str
    is_entry: bool
    instrs: list[Instr] = field(default_factory=list)


_COMP_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(|\{)")
_INSTR_HEAD_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')


def _parse_instr(line: str) -> Instr | None:
    head = _INSTR_HEAD_RE.match(line)
    if not head:
        return None
    pos = head.end()
    if pos >= len(line):
        return None
    if line[pos] == "(":
        end = matching(line, pos)
    else:
        end = pos
        while end < len(line) and not line[end].isspace():
            end += 1
    shape = line[pos:end]
    op = re.match(r"\s*([\w\-]+)\(", line[end:])
    if not op:
        return None
    open_paren = end + op.end() - 1
    close = matching(line, open_paren)
    operand_text = line[open_paren + 1 : close - 1]
    operands = re.findall(r"%([\w.\-]+)", operand_text) or [
        p.split()[-1] for p in split_top_level(operand_text) if p
    ]
    return Instr(head.group(1), shape, op.group(1), operands, operand_text, line[close:])


def parse_module(hlo_text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for line in hlo_text.splitlines():
        if current is None:
            if line and not line[0].isspace() and line.rstrip().endswith("{"):
                header = _COMP_HEADER_RE.match(line)
                if header and not line.startswith("HloModule"):
                    current = Computation(header.group(2), bool(header.group(1)))
                    comps[current.name] = current
            continue
        if line.strip() == "}" and not line[0].isspace():
            current = None
            continue
        instr = _parse_instr(line)
        if instr is not None:
            current.instrs.append(instr)
    return comps


def callees(instr: Instr) -> list[str]:
    """Computations an instruction calls (async-done/update repeat the start's)."""
    if instr.opcode.endswith("-done") or instr.opcode.endswith("-update"):
        return []
    attrs = _STRING_RE.sub('""', instr.attrs)
    names = re.findall(rf"(?<![\w.\-])(?:{'|'.join(_CALL_ATTRS)})=%?([\w.\-]+)", attrs)
    for body in re.findall(rf"(?<![\w.\-])(?:{'|'.join(_CALL_LIST_ATTRS)})=\{{([^}}]*)\}}", attrs):
        names += [n.strip().lstrip("%") for n in body.split(",") if n.strip()]
    return names


