#!/usr/bin/env python3
"""Means of `scripts/gpu-ab`'s benches run in rounds (FP8KV_AB_ROUNDS): every variant benched in
turns, so that the machine's drift over a call falls on all of them alike.

    scripts/ab_rounds.py ROUNDS.txt

ROUNDS.txt holds one kept bench row per line, prefixed by its variant and a tab (gpu-ab writes
it). A row is named by its text fields (shape, scheme, kernel); its figures are its numeric
fields (a trailing % is dropped; `nan%` is text). For each row: per variant the mean of every
figure over the rounds, the rounds' values of its first figure (time) and that mean's change
against the first variant (A)."""
import collections
import sys


def split_row(line):
    """(name, figures) of a bench row: fields are separated by two or more spaces."""
    fields = [f for f in line.strip().replace("\t", "  ").split("  ") if f.strip()]
    name, figures = [], []
    for f in (f.strip() for f in fields):
        try:
            figures.append(float(f[:-1] if f.endswith("%") else f))
        except ValueError:
            name.append(f)
        else:
            if figures[-1] != figures[-1]:  # nan: text, not a figure
                figures.pop()
                name.append(f)
    return " ".join(name), figures


def summarize(lines):
    variants, rows = [], collections.OrderedDict()
    for line in lines:
        if "\t" not in line:
            continue
        variant, row = line.rstrip("\n").split("\t", 1)
        name, figures = split_row(row)
        if not figures:
            continue
        if variant not in variants:
            variants.append(variant)
        rows.setdefault(name, collections.defaultdict(list))[variant].append(figures)
    out = []
    for name, by_variant in rows.items():
        out.append(name)
        base = None
        for v in variants:
            runs = by_variant.get(v)
            if not runs:
                continue
            n = min(len(r) for r in runs)
            means = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
            if base is None:
                base = means[0]
            change = f"{100.0 * (means[0] / base - 1.0):+.1f}%" if base else "n/a"
            values = ",".join(f"{r[0]:g}" for r in runs)
            out.append(f"    {v:<28} {' '.join(f'{m:.1f}' for m in means):<30} "
                       f"time {change} [{values}]")
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        with open(sys.argv[1]) as f:
            lines = f.readlines()
    except OSError as e:
        sys.exit(f"ab_rounds: cannot read {sys.argv[1]}: {e.strerror}")
    out = summarize(lines)
    if not out:
        sys.exit(f"ab_rounds: no bench rows in {sys.argv[1]} (lines of VARIANT<tab>ROW)")
    print("\n".join(out))


if __name__ == "__main__":
    main()
