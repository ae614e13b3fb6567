"""How often each computation of an HLO module runs per step: while-loop trip counts (read from
``known_trip_count`` or inferred from the loop condition), multiplied through nested loops."""

from __future__ import annotations

import re
from collections.abc import Mapping

from meshjax.hlo.text import Computation, Instr, callees

_KNOWN_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?')


def _reachable(comps: Mapping[str, Computation], root: str) -> list[Computation]:
    seen, stack, out = {root}, [root], []
    while stack:
        comp = comps[stack.pop()]
        out.append(comp)
        for instr in comp.instrs:
            for callee in callees(instr):
                if callee in comps and callee not in seen:
                    seen.add(callee)
                    stack.append(callee)
    return out


def _infer_trip_count(comps: Mapping[str, Computation], condition: str) -> int | None:
    """Trip count of ``i < N``-style loops from the condition's single int constant.

    Assumes the induction variable starts at 0 and steps by 1 (what ``fori_loop``
    and ``scan`` produce); gives up (None) unless exactly one compare and one
    integer scalar constant are found.
    """
    if condition not in comps:
        return None
    instrs = [i for c in _reachable(comps, condition) for i in c.instrs]
    compares = [i for i in instrs if i.opcode == "compare"]
    constants = {
        int(i.operand_text)
        for i in instrs
        if i.opcode == "constant"
        and re.fullmatch(r"[su](8|16|32|64)\[\]", i.shape.split("{")[0])
        and re.fullmatch(r"-?\d+", i.operand_text.strip())
    }
    if len(compares) != 1 or len(constants) != 1:
        return None
    direction = re.search(r"direction=(\w+)", compares[0].attrs)
    (bound,) = constants
    if direction and direction.group(1) in ("LT", "GT", "NE"):
        return max(bound, 0)
    if direction and direction.group(1) in ("LE", "GE"):
        return max(bound + 1, 0)
    return None


def _trip_count(instr: Instr, comps: Mapping[str, Computation]) -> tuple[int, bool]:
    """(trip count, known) of a while instruction."""
    known = _KNOWN_TRIP_RE.search(instr.attrs)
    if known:
        return int(known.group(1)), True
    cond = re.search(r"(?<![\w.\-])condition=%?([\w.\-]+)", instr.attrs)
    inferred = _infer_trip_count(comps, cond.group(1)) if cond else None
    if inferred is not None:
        return inferred, True
    return 1, False


def run_counts(comps: Mapping[str, Computation]) -> dict[str, tuple[int, bool]]:
    """computation -> (runs per step, all enclosing trip counts known), from ENTRY."""
    entry = next((c.name for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    callers: dict[str, list[tuple[str, int, bool]]] = {}
    for comp in _reachable(comps, entry):
        for instr in comp.instrs:
            factor, known = (1, True)
            if instr.opcode == "while":
                factor, known = _trip_count(instr, comps)
            for callee in callees(instr):
                callers.setdefault(callee, []).append((comp.name, factor, known))

    memo: dict[str, tuple[int, bool]] = {entry: (1, True)}

    def runs(name: str) -> tuple[int, bool]:
        if name not in memo:
            total, all_known = 0, True
            for caller, factor, known in callers.get(name, []):
                n, k = runs(caller)
                total += n * factor
                all_known &= k and known
            memo[name] = (total, all_known)
        return memo[name]

    return {c.name: runs(c.name) for c in _reachable(comps, entry)}


