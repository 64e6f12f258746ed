"""scripts/sass_summary.py, the digest of scripts/gpu-profile-source: the samples of a setmaxnreg
kernel split by role (the code after USETMAXREG.TRY_ALLOC: consumers, after .DEALLOC: producers),
the retry loops that ptxas puts after the last EXIT counted with the role that branches there; a
file that is not ncu's source page is refused by name."""
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "sass_summary.py")
HEAD = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
        "stall_long_sb", "stall_wait", "stall_long_sb (Not Issued)"]


def kernel_csv(tmp_path, rows):
    lines = ['"Kernel Name","void k(int)",']
    for r in [HEAD] + rows:
        lines.append(",".join(f'"{c}"' for c in r))
    path = tmp_path / "sass.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


def role_share(out, role):
    line = next(l for l in out.splitlines() if l.strip().startswith(role + " "))
    return float(line.split()[1].rstrip("%"))


def test_roles_split_the_samples_and_the_tail_follows_its_branch(tmp_path):
    # address, source, samples, executed, long_sb, wait, long_sb (not issued)
    rows = [
        ["0x10", "S2R R0, SR_TID.X", "2", "10", "0", "2", "0"],
        ["0x20", "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0x68", "0", "5", "0", "0", "0"],
        ["0x30", "HMMA.16816.F32 R4, R8, R12, R4", "8", "100", "0", "8", "0"],
        ["0x40", "@!P0  BRA 0x100", "30", "50", "30", "0", "30"],  # the full-stage wait
        ["0x50", "@P1   EXIT", "0", "5", "0", "0", "0"],
        ["0x60", "USETMAXREG.DEALLOC.CTAPOOL 0x20", "0", "5", "0", "0", "0"],
        ["0x70", "ISETP.GT.AND P0, PT, R9, -0x1, PT", "20", "40", "20", "0", "20"],
        ["0x80", "@!P2  BRA 0x120", "0", "40", "0", "0", "0"],
        ["0x90", "EXIT", "0", "5", "0", "0", "0"],
        ["0x100", "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2", "10", "20", "10", "0", "10"],
        ["0x110", "BRA 0x40", "0", "20", "0", "0", "0"],
        ["0x120", "NANOSLEEP 0x20", "30", "20", "0", "30", "0"],
        ["0x130", "BRA 0x80", "0", "20", "0", "0", "0"],
    ]
    res = run(kernel_csv(tmp_path, rows), "--top", "3")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "13 SASS instructions, 100 samples" in out
    # consumers: 8 + 30 + the retry block at 0x100 (10); producers: 20 + the block at 0x120 (30).
    assert role_share(out, "entry") == 2.0
    assert role_share(out, "consumers") == 48.0
    assert role_share(out, "producers") == 50.0
    assert "tail" not in out.split("samples by role")[1]
    consumers = next(l for l in out.splitlines() if l.strip().startswith("consumers "))
    assert "long_sb 83.3%" in consumers and "wait 16.7%" in consumers
    top = [l for l in out.splitlines() if l.strip().startswith(("30.0%", "20.0%"))]
    assert len(top) == 3 and "consumers long_sb" in top[0] and "producers wait" in top[1]


def test_a_plain_kernel_has_no_roles(tmp_path):
    rows = [["0x10", "HMMA.16816.F32 R4, R8, R12, R4", "5", "10", "5", "0", "5"],
            ["0x20", "EXIT", "0", "1", "0", "0", "0"]]
    res = run(kernel_csv(tmp_path, rows))
    assert res.returncode == 0, res.stderr
    assert "samples by role" not in res.stdout
    assert "HMMA 90.9%" in res.stdout


def test_not_a_source_page_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text('"ID","Kernel Name"\n"0","k"\n')
    res = run(path)
    assert res.returncode != 0
    assert "no 'Address' header row" in res.stderr
