#!/usr/bin/env python3
"""Digest of Nsight Compute's per-instruction view of one kernel launch (scripts/gpu-profile-source
writes it: `ncu -i R --page source --csv --print-source sass`).

    scripts/sass_summary.py SASS.csv [--top N]

Prints the N instructions with the most warp stall samples (their share, address, the role of the
code they belong to and their leading stall reason), the executed instruction mix by opcode and,
for a warp-specialized kernel (one that moves registers between its warps with `setmaxnreg`), the
samples of each role with its leading stall reasons. A role is the code after a USETMAXREG: after
`.DEALLOC` the warps that gave registers away (the producers), after `.TRY_ALLOC` those that took
them (the consumers), before the first one the entry code both run. The out-of-line blocks that
ptxas puts after the kernel's last EXIT (an mbarrier wait's retry loop) belong to the role whose
branch jumps to them. Runs on the GPU machine after a profile, or here on a fetched CSV.
"""
import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def number(s):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return 0.0


def read(path):
    """The header and the instruction rows (every row as long as the header)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        raise SystemExit(f"{path}: no 'Address' header row (not an ncu --page source --csv file)")
    head = [h.strip() for h in rows[start]]
    for need in ("Source", SAMPLES):
        if need not in head:
            raise SystemExit(f"{path}: no '{need}' column; columns: {', '.join(head)}")
    body = [r for r in rows[start + 1:] if len(r) == len(head)]
    return head, body


def opcode(text):
    words = text.split()
    if not words:
        return ""
    op = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return op.split(".")[0]


def roles(body, src):
    """The role of each instruction: entry, consumers, producers (see the module's docstring)."""
    role, out = "entry", []
    for r in body:
        text = r[src]
        if "USETMAXREG" in text:
            role = "producers" if ".DEALLOC" in text else "consumers"
        out.append(role)
    # The tail: what follows the last unpredicated EXIT.
    last_exit = max((i for i, r in enumerate(body) if opcode(r[src]) == "EXIT" and not r[src].split()[0].startswith("@")),
                    default=len(body) - 1)
    index = {r[0].strip(): i for i, r in enumerate(body)}
    for i in range(last_exit + 1, len(body)):
        out[i] = "tail"
    for i in range(last_exit + 1):  # branches from the body into the tail
        words = body[i][src].split()
        if opcode(body[i][src]) != "BRA" or not words:
            continue
        j = index.get(words[-1])
        while j is not None and j > last_exit and j < len(body) and out[j] == "tail":
            out[j] = out[i]
            if opcode(body[j][src]) in ("BRA", "EXIT"):
                break
            j += 1
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    head, body = read(args.csv)
    src, samp = head.index("Source"), head.index(SAMPLES)
    stall_cols = [i for i, h in enumerate(head) if h.startswith("stall_") and "Not Issued" not in h]
    role_of = roles(body, src)
    specialized = any("USETMAXREG" in r[src] for r in body)

    def leading(r, k=1):
        pairs = sorted(((number(r[c]), head[c][len("stall_"):]) for c in stall_cols), reverse=True)
        return [name for n, name in pairs[:k] if n > 0]

    total = sum(number(r[samp]) for r in body) or 1.0
    print(f"{len(body)} SASS instructions, {total:.0f} samples")
    order = sorted(range(len(body)), key=lambda i: -number(body[i][samp]))[:args.top]
    for i in order:
        r = body[i]
        tag = f"{role_of[i]:9s} " if specialized else ""
        why = ",".join(leading(r)) or "-"
        print(f"{number(r[samp]) / total * 100:5.1f}%  {r[0].strip():>6}  {tag}{why:14s} {r[src].strip()[:80]}")
    if "Instructions Executed" in head:
        ex = head.index("Instructions Executed")
        mix = collections.Counter()
        for r in body:
            mix[opcode(r[src])] += number(r[ex])
        executed = sum(mix.values()) or 1.0
        print(f"{executed:.4g} warp instructions executed; by opcode:")
        print("  " + ", ".join(f"{op} {n / executed * 100:.1f}%" for op, n in mix.most_common(20)))
    if specialized:
        print("samples by role (setmaxnreg), each with its leading stall reasons:")
        for role in ("entry", "consumers", "producers", "tail"):
            rows = [r for r, o in zip(body, role_of) if o == role]
            n = sum(number(r[samp]) for r in rows)
            if n == 0:
                continue
            reasons = collections.Counter()
            for r in rows:
                for c in stall_cols:
                    reasons[head[c][len("stall_"):]] += number(r[c])
            top = ", ".join(f"{name} {v / n * 100:.1f}%" for name, v in reasons.most_common(5))
            print(f"  {role:9s} {n / total * 100:5.1f}% of samples: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
