"""Memory traffic of a compiled program, counted on its optimised HLO: what every kernel reads and writes.

Each top-level instruction of the program (a fusion, a library call such as a cuBLAS GEMM or cuDNN attention, a
copy...) is one kernel that reads its operands and writes its result from and to device memory; its bytes are
the sizes of those arrays. A loop's body counts as often as its known trip count (the ViT's scanned blocks, the
chunked attention's blocks), a conditional as its largest branch; what happens inside a fusion stays on chip
and is not counted. XLA's own cost analysis counts a loop's body once, so it cannot compare programs that loop.
The same account for every backend and both attention paths: the ratio of two programs' counts is the
meaningful figure (caches, which can serve repeated reads, are not modelled).
"""

from __future__ import annotations

import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 1, "u4": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
# Instructions that move no data of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_FREE |= {"opt-barrier", "add-dependency", "copy-start", "async-done", "domain"}


def _array_bytes(type_text: str) -> int:
    """Bytes of every array in a (possibly tuple) HLO type, e.g. "(f32[2,3]{1,0}, s32[])" -> 28."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _BYTES.get(dtype, 1)  # fp8 and other 1-byte types
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size
    return total


def _split_operands(text: str) -> tuple[list[str], str]:
    """The operand names of an instruction's argument list (up to its closing parenthesis) and the rest."""
    depth, i = 1, 0
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    names = re.findall(r"%([\w.\-]+)", text[: i - 1])
    return names, text[i:]


def parse(hlo_text: str) -> tuple[dict[str, list[tuple]], str]:
    """{computation: [(name, opcode, result bytes, operand names, attributes)]} and the entry's name."""
    computations, entry, current = {}, "", None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            current = computations.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            name, type_text, opcode, rest = instruction.groups()
            operands, attributes = _split_operands(rest)
            current.append((name, opcode, _array_bytes(type_text), operands, attributes))
    return computations, entry


def _called(attributes: str, key: str) -> list[str]:
    match = re.search(rf"{key}=\{{?([^}},]+(?:,\s*%[\w.\-]+)*)\}}?", attributes)
    return re.findall(r"%?([\w.\-]+)", match.group(1)) if match else []


def _trip_count(attributes: str) -> int:
    match = re.search(r"known_trip_count[\"']?\s*:\s*\{[^}]*?[\"']?n[\"']?\s*:\s*[\"']?(\d+)", attributes)
    return int(match.group(1)) if match else 1


def traffic_bytes(hlo_text: str) -> int:
    """Bytes read and written by the kernels of one execution of the program (per device)."""
    computations, entry = parse(hlo_text)
    memo: dict[str, int] = {}

    def total(name: str) -> int:
        if name in memo:
            return memo[name]
        memo[name] = 0  # a recursion guard; HLO has none
        sizes = {n: size for n, _, size, _, _ in computations.get(name, [])}
        count = 0
        for _, opcode, size, operands, attributes in computations.get(name, []):
            if opcode == "while":
                count += _trip_count(attributes) * sum(total(c) for c in _called(attributes, "body"))
            elif opcode == "conditional":
                count += max((total(c) for c in _called(attributes, "branch_computations")), default=0)
            elif opcode in ("call", "async-start"):
                count += sum(total(c) for c in _called(attributes, "calls") or _called(attributes, "to_apply"))
            elif opcode not in _FREE:
                count += size + sum(sizes.get(o, 0) for o in operands)
        memo[name] = count
        return count

    return total(entry)
