"""scripts/ab_rounds.py, the means of scripts/gpu-ab's benches in rounds: each row's figures
averaged per variant, the time's change against the first variant, text fields (and `nan%`) kept
as the row's name; an input without rows refused by name."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "ab_rounds.py")

# Rows as `fp8kv bench kernels` prints them: fields two or more spaces apart.
PREFILL = "  B=2 L=8192 Hq32/8 D128    fp8-per-head    default  {t:>10}     {f}     nan%"
DECODE = "  B=64 L=4096 Hq32/8 D128   bf16     {t}     4135     {p}%       1.00"


def run(path):
    return subprocess.run([sys.executable, SCRIPT, str(path)], capture_output=True, text=True)


def test_rounds_average_per_variant_against_the_first(tmp_path):
    lines = []
    for a_t, b_t in ((1460.0, 1440.0), (1470.0, 1450.0)):  # two rounds, A then B
        lines.append("A\t" + PREFILL.format(t=a_t, f=750.0))
        lines.append("A\t" + DECODE.format(t=260.0, p=91.0))
        lines.append("ab/x.diff\t" + PREFILL.format(t=b_t, f=760.0))
        lines.append("ab/x.diff\t" + DECODE.format(t=250.0, p=93.0))
    lines.append("gpu-ab on NVIDIA H200")  # not a row: skipped
    path = tmp_path / "rounds.txt"
    path.write_text("\n".join(lines) + "\n")
    r = run(path)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    prefill = out.index("B=2 L=8192 Hq32/8 D128 fp8-per-head default nan%")
    a, b = out[prefill + 1].split(), out[prefill + 2].split()
    assert a[:3] == ["A", "1465.0", "750.0"] and a[4] == "+0.0%"
    assert b[:3] == ["ab/x.diff", "1445.0", "760.0"] and b[4] == "-1.4%"
    assert b[5] == "[1440,1450]"
    decode = out.index("B=64 L=4096 Hq32/8 D128 bf16")
    assert out[decode + 2].split()[1:5] == ["250.0", "4135.0", "93.0", "1.0"]
    assert out[decode + 2].split()[6] == "-3.8%"


def test_no_rows_is_refused_by_name(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("gpu-ab on NVIDIA H200\n== A (rc=0)\n")
    r = run(path)
    assert r.returncode != 0 and "no bench rows" in r.stderr and "empty.txt" in r.stderr
    r = run(tmp_path / "missing.txt")
    assert r.returncode != 0 and "cannot read" in r.stderr
