"""scripts/sass_loops.py, the loop digest of scripts/gpu-sass: loops found as backward branches,
the retry blocks that ptxas puts after the last EXIT not taken for loops, the optional blocks of
the innermost loops listed, a gzipped dump read as a plain one, and a file without kernels or a
pattern that matches none refused by name."""
import gzip
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "sass_loops.py")


def dump(tmp_path, lines, name="k.sass", zipped=False):
    text = "\n".join(lines) + "\n"
    path = tmp_path / (name + (".gz" if zipped else ""))
    if zipped:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True)


KERNEL = [
    "\tcode for sm_90a",
    "\t\tFunction : _Z6kernelv",
    "        /*0000*/                   S2R R0, SR_TID.X ;             /* 0x0 */",
    # the outer loop 0x10..0xa0, with the inner loop 0x20..0x70 in it
    "        /*0010*/                   IMAD R1, R0, 0x2, RZ ;         /* 0x0 */",
    "        /*0020*/                   FFMA R2, R1, R1, R2 ;          /* 0x0 */",
    "        /*0030*/               @P0 BRA 0x60 ;                     /* 0x0 */",
    "        /*0040*/                   FMNMX R3, R2, R3, !PT ;        /* 0x0 */",
    "        /*0050*/                   FMNMX R3, R2, R4, !PT ;        /* 0x0 */",
    "        /*0060*/                   FFMA R2, R2, R2, R2 ;          /* 0x0 */",
    "        /*0070*/              @!P1 BRA 0x20 ;                     /* 0x0 */",
    "        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R5 ;  /* 0x0 */",
    "        /*0090*/              @!P2 BRA 0xc0 ;                     /* 0x0 */",
    "        /*00a0*/              @!P3 BRA 0x10 ;                     /* 0x0 */",
    "        /*00b0*/                   EXIT ;                         /* 0x0 */",
    # the wait's retry block: branches back, but is no loop of the kernel's
    "        /*00c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R5 ;  /* 0x0 */",
    "        /*00d0*/              @!P2 BRA 0xc0 ;                     /* 0x0 */",
    "        /*00e0*/                   BRA 0x90 ;                     /* 0x0 */",
    "        /*00f0*/                   BRA 0xf0 ;                     /* 0x0 */",
]


def test_loops_are_backward_branches_before_the_last_exit(tmp_path):
    res = run(dump(tmp_path, KERNEL, zipped=True), "--min", "2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "_Z6kernelv: 16 instructions"
    loops = [l.strip() for l in lines if l.strip().startswith("loop ")]
    assert loops == [
        "loop 0x0010..0x00a0: 10 instructions: BRA 4, FFMA 2, FMNMX 2, IMAD 1, SYNCS 1",
        "loop 0x0020..0x0070: 6 instructions: FFMA 2, BRA 2, FMNMX 2",
    ]
    # only the innermost loop lists what a forward branch may skip: the two FMNMX
    skips = [l.strip() for l in lines if "may skip" in l]
    assert skips == ["0x0030 may skip 2 to 0x0060"]
    # the retry block's branches back (0xe0 -> 0x90, 0xd0 -> 0xc0) are not loops
    assert not any("0x0090.." in l or "0x00c0.." in l for l in loops)


def test_min_leaves_out_small_loops_and_kernel_picks_one(tmp_path):
    path = dump(tmp_path, KERNEL)
    res = run(path, "--min", "7")
    assert res.returncode == 0, res.stderr
    assert [l.split(":")[0].strip() for l in res.stdout.splitlines() if "loop " in l] == [
        "loop 0x0010..0x00a0"
    ]
    res = run(path, "--kernel", "other")
    assert res.returncode != 0 and "no kernel matches 'other'" in res.stderr


def test_a_file_without_kernels_is_refused(tmp_path):
    res = run(dump(tmp_path, ["not", "a", "dump"]))
    assert res.returncode != 0 and "no kernels in" in res.stderr
