"""scripts/gpu-ab, the A/B of kernel patches in one device call, run here on stand-ins for the
GPU build: a fake `gpu-check build` and `cmake --build` that write a bench whose row reports the
tree's value.txt, and a test binary that sleeps. What it checks: every variant is benched in
rounds and compared with A, the tree is restored, $OUT holds only the rounds' table and one log
archive (the device tool brings back a few files), and FP8KV_DEADLINE cuts a variant's tests off
or skips them so that the script ends before it."""
import os
import stat
import subprocess
import sys
import tarfile
import time

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

# Writes build-gpu/fp8kv, whose one bench row's time is the tree's value.txt, and a test binary
# that passes one test and then sleeps FAKE_TEST_SLEEP seconds before its summary.
FAKE_BUILD = """#!/usr/bin/env bash
set -e
mkdir -p build-gpu
v=$(cat value.txt)
cat >build-gpu/fp8kv <<EOF
#!/usr/bin/env bash
echo "  B=2 L=8192 Hq32/8 D128    bf16    default     $v     600.0     nan%"
EOF
cat >build-gpu/fp8kv_gpu_tests <<'EOF'
#!/usr/bin/env bash
echo "[ RUN      ] Fake.One"
echo "[       OK ] Fake.One (0 ms)"
sleep ${FAKE_TEST_SLEEP:-0}
echo "[  PASSED  ] 1 test."
EOF
chmod +x build-gpu/fp8kv build-gpu/fp8kv_gpu_tests
"""
FAKE_CHECK = """#!/usr/bin/env bash
mkdir -p "$OUT" && echo "fake build" >"$OUT/build.log" && exec scripts/fake-build
"""
FAKE_CMAKE = """#!/usr/bin/env bash
[ "$1" = --build ] && exec scripts/fake-build
exit 1
"""


def write_exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def git(tree, *args):
    subprocess.run(["git", "-C", str(tree), *args], check=True, capture_output=True)


def make_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    for name in ("gpu-ab", "ab_rounds.py"):
        write_exe(tree / "scripts" / name, open(os.path.join(ROOT, "scripts", name)).read())
    write_exe(tree / "scripts" / "fake-build", FAKE_BUILD)
    write_exe(tree / "scripts" / "gpu-check", FAKE_CHECK)
    (tree / "value.txt").write_text("100.0\n")
    git(tree, "init", "-q")
    git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(tree, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tree")
    patches = []
    for name, value in (("v90", "90.0"), ("v110", "110.0")):
        (tree / "value.txt").write_text(value + "\n")
        diff = subprocess.run(["git", "-C", str(tree), "diff"], check=True, capture_output=True,
                              text=True).stdout
        git(tree, "checkout", "-q", "value.txt")
        (tree / "ab").mkdir(exist_ok=True)
        (tree / "ab" / f"{name}.diff").write_text(diff)
        patches.append(f"ab/{name}.diff")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "cmake", FAKE_CMAKE)
    write_exe(bin_dir / "nvidia-smi", "#!/usr/bin/env bash\necho Fake GPU\n")
    return tree, bin_dir, patches


def run_ab(tmp_path, tree, bin_dir, patches, **env):
    out = tmp_path / "out"
    full_env = dict(os.environ, OUT=str(out), PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    start = time.monotonic()
    r = subprocess.run(["bash", "scripts/gpu-ab", *patches], cwd=tree, env=full_env,
                       capture_output=True, text=True, timeout=120)
    return r, out, time.monotonic() - start


def archived(out):
    with tarfile.open(out / "ab-logs.tar.gz") as tar:
        return {os.path.basename(n) for n in tar.getnames() if n != "."}


def test_rounds_compare_every_variant_with_a_and_keep_out_small(tmp_path):
    tree, bin_dir, patches = make_tree(tmp_path)
    r, out, _ = run_ab(tmp_path, tree, bin_dir, patches, FP8KV_AB_ROUNDS="2",
                       FP8KV_AB_TEST_FILTER="Fake.*", FP8KV_AB_GREP="default")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    row = lines.index("B=2 L=8192 Hq32/8 D128 bf16 default nan%")
    a, v90, v110 = (lines[row + i].split() for i in (1, 2, 3))
    assert a[:2] == ["A", "100.0"]
    assert v90[:2] == ["ab/v90.diff", "90.0"] and "-10.0%" in v90
    assert v110[:2] == ["ab/v110.diff", "110.0"] and "+10.0%" in v110
    assert "ab/v90.diff tests rc=0: [  PASSED  ] 1 test." in r.stdout
    assert (tree / "value.txt").read_text() == "100.0\n"  # every patch reverted
    # Only the rounds' table and the archive are left in $OUT, with every log inside it.
    assert sorted(os.listdir(out)) == ["ab-logs.tar.gz", "ab-rounds.txt"]
    logs = archived(out)
    for name in ("ab-A-r1.log", "ab-A-r2.log", "ab-ab_v90.diff-r2.log", "ab-ab_v110.diff-r1.log",
                 "ab-ab_v90.diff.log.tests", "ab-build-ab_v110.diff.log", "build.log"):
        assert name in logs, (name, logs)


def test_the_deadline_cuts_tests_off_and_skips_what_no_longer_fits(tmp_path):
    tree, bin_dir, patches = make_tree(tmp_path)
    # The limit keeps 10 s for the end: of a deadline of 30 s the first variant's tests get what
    # is left of 20 after the builds and benches before them (they sleep 60) and are cut off; the
    # second's no longer fit and are skipped. (A deadline of 17 left them 7 s, which a busy
    # machine's builds could take whole, skipping the first variant's tests too: a flaky test.)
    r, out, took = run_ab(tmp_path, tree, bin_dir, patches, FP8KV_DEADLINE="30",
                          FP8KV_AB_TEST_FILTER="Fake.*", FAKE_TEST_SLEEP="60")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ab/v90.diff tests cut off after" in r.stdout and "1 passed before" in r.stdout
    assert "ab/v110.diff tests: skipped, past FP8KV_DEADLINE" in r.stdout
    assert took < 30
    assert "ab-ab_v90.diff.log.tests" in archived(out)
    assert sorted(os.listdir(out)) == ["ab-logs.tar.gz", "ab-rounds.txt"]


if __name__ == "__main__":
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))
