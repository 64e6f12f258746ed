#!/usr/bin/env python3
"""The loops of a kernel's SASS and what their bodies are made of, from `cuobjdump -sass` output
(scripts/gpu-sass writes it; this machine has no disassembler, the GPU machine has).

    scripts/sass_loops.py FILE.sass[.gz] [--kernel REGEX] [--min N] [--top K]

For each kernel whose mangled name matches REGEX (default: every kernel): each loop, found as a
backward branch (its target up to the branch), with its instruction count and its opcodes by
count, and the blocks inside it that a forward branch can skip (a diagonal tile's mask, a lane's
arrival) of the innermost loops, so that a loop's common path reads as its count minus those.
Loops under N
instructions (default 20) are left out (a barrier's retry loop).
"""
import argparse
import collections
import gzip
import re
import sys

# `@!P1 BRA 0x10` -> BRA (no predicate, no modifiers), as the profile digest reads it.
from sass_summary import opcode

INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
BRANCH = re.compile(r"\bBRA\b(?:\s+\S+,)?\s+(?:`\()?(0x[0-9a-f]+)")


def read_kernels(path):
    """{mangled name: [(address, text)]} in file order."""
    opener = gzip.open if path.endswith(".gz") else open
    kernels, current = {}, None
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            m = FUNCTION.match(line)
            if m:
                current = kernels.setdefault(m.group(1), [])
                continue
            m = INSTRUCTION.match(line)
            if m and current is not None:
                current.append((int(m.group(1), 16), m.group(2)))
    return kernels


def branches(code):
    """(address, target) of every branch with a literal target."""
    out = []
    for address, text in code:
        if opcode(text) == "BRA":
            m = BRANCH.search(text)
            if m:
                out.append((address, int(m.group(1), 16)))
    return out


def loops(code, min_size):
    """(start, end, body) of each backward branch's loop, outermost first. Past the kernel's last
    unpredicated EXIT, ptxas puts out-of-line blocks (an mbarrier wait's retry) that branch back
    into the kernel: not loops."""
    exits = [a for a, t in code if t.split()[0] == "EXIT"]
    last = exits[-1] if exits else code[-1][0]
    found = []
    for address, target in branches(code):
        if target <= address <= last:
            body = [(a, t) for a, t in code if target <= a <= address]
            if len(body) >= min_size:
                found.append((target, address, body))
    found.sort(key=lambda x: (x[0], -x[1]))
    return found


def skippable(body, start, end):
    """Forward branches inside [start, end] that jump over part of it: (from, to, count)."""
    out = []
    for address, target in branches(body):
        if address < target <= end:
            count = sum(1 for a, _ in body if address < a < target)
            if count:
                out.append((address, target, count))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sass", help="cuobjdump -sass output, plain or .gz")
    parser.add_argument("--kernel", default="", help="regex on the mangled kernel name")
    parser.add_argument("--min", type=int, default=20, help="smallest loop to list")
    parser.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
    args = parser.parse_args()
    kernels = read_kernels(args.sass)
    if not kernels:
        sys.exit(f"sass_loops: no kernels in {args.sass} (not cuobjdump -sass output?)")
    pattern = re.compile(args.kernel)
    shown = 0
    for name, code in kernels.items():
        if not pattern.search(name):
            continue
        shown += 1
        print(f"{name}: {len(code)} instructions")
        found = loops(code, args.min)
        for start, end, body in found:
            mix = collections.Counter(opcode(t) for _, t in body)
            top = ", ".join(f"{op} {n}" for op, n in mix.most_common(args.top))
            print(f"  loop {start:#06x}..{end:#06x}: {len(body)} instructions: {top}")
            inner = any(start <= s2 and e2 <= end and (s2, e2) != (start, end)
                        for s2, e2, _ in found)
            if not inner:  # the innermost loops' optional blocks (outer ones' would repeat them)
                for frm, to, count in skippable(body, start, end):
                    print(f"    {frm:#06x} may skip {count} to {to:#06x}")
    if not shown:
        sys.exit(f"sass_loops: no kernel matches {args.kernel!r}")


if __name__ == "__main__":
    main()
