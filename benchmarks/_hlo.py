"""Collectives in compiled (SPMD-partitioned) HLO text, per computation and per loop body.

``collectives(text)`` lists every all-gather / all-reduce / all-to-all / reduce-scatter /
collective-permute with its result dtype and shape (a combined, tuple-shaped collective gives
one entry per component); ``loop_collectives(text)`` keeps those that run once per iteration
of a ``while`` loop: in the loop's body and condition computations and in every computation
they call. Bytes are the collective's result size on one device.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) "
    r"(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_CALLED = re.compile(
    r"(?:body|condition|to_apply|calls|branch_computations|called_computations)="
    r"(\{[^}]*\}|%?[\w.\-]+)"
)
_WHILE = re.compile(r"%([\w.\-]+) = .* while\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip


class Collective(NamedTuple):
    op: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = _BYTES.get(self.dtype, 4)
        for d in self.shape:
            n *= d
        return n


def _parse(lines) -> list[Collective]:
    return [
        Collective(m.group(2), dtype, tuple(int(d) for d in dims.split(",") if d))
        for line in lines
        for m in _COLLECTIVE.finditer(line)
        for dtype, dims in _SHAPE.findall(m.group(1))
    ]


def computations(hlo_text: str) -> dict[str, list[str]]:
    """``{computation name: its instruction lines}`` of an HLO module's text."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and (m := _HEADER.match(line)):
            current = m.group(1)
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the module."""
    return _parse(hlo_text.splitlines())


def loop_collectives(hlo_text: str) -> dict[str, list[Collective]]:
    """``{while op name: the collectives run once per iteration of that loop}``: those in its
    body and condition computations and in the computations they call, transitively, but not
    those of loops nested in it (which have their own entry). A loop whose body holds no
    other loop is innermost (:func:`innermost`)."""
    comps = computations(hlo_text)
    out = {}
    for name, cond, body in _WHILE.findall(hlo_text):
        seen: set[str] = set()
        stack = [cond, body]
        while stack:
            comp = stack.pop()
            if comp in seen or comp not in comps:
                continue
            seen.add(comp)
            for line in comps[comp]:
                if " while(" in line:
                    continue  # a nested loop: counted per its own iteration
                for group in _CALLED.findall(line):
                    stack.extend(n.strip().lstrip("%") for n in group.strip("{}").split(","))
        out[name] = _parse(line for comp in sorted(seen) for line in comps[comp])
    return out


def innermost(hlo_text: str) -> list[str]:
    """Names of the ``while`` ops whose body and condition contain no other ``while``."""
    comps = computations(hlo_text)
    return [
        name
        for name, cond, body in _WHILE.findall(hlo_text)
        if not any(" while(" in line for c in (cond, body) for line in comps.get(c, []))
    ]
