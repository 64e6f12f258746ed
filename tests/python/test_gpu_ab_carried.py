"""scripts/gpu-ab-carried, the A/B of binaries built here and carried to the device, run on
stand-ins: an archive build-ncu/ab.txz of variant folders whose `fp8kv` prints one bench row
with the variant's own time and whose `fp8kv_gpu_tests` passes or fails. What it checks: every
variant is benched in every round, in turns, and compared with the first; the tests of a variant
that carries them run first and their failures are named; a variant the archive lacks is
refused by name before anything runs; bench arguments that the bench refuses (checked with the
GPU hidden) and a test filter that names no test stop the script before any test or bench runs;
the tests' summaries come again after the rounds' table; $OUT keeps only the rounds' table."""
import os
import subprocess
import tarfile

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")

# With the GPU hidden (CUDA_VISIBLE_DEVICES empty) the real bench checks its arguments and then
# stops for want of a GPU; the stand-in refuses the case name NOPE as the real one would.
BENCH = """#!/usr/bin/env bash
if [ "${{CUDA_VISIBLE_DEVICES-unset}}" = "" ]; then
  case " $* " in
    *" --decode-case NOPE "*)
      echo "fp8kv: error: bench kernels --decode-case: no case 'NOPE'"; exit 1;;
  esac
  echo "fp8kv: error: bench kernels: no usable Hopper (sm_90) GPU on this machine"; exit 1
fi
echo "ceilings: read 4600 GB/s | copy (read+write) 4200 GB/s"
echo "$0 $*" >>"$CALLS"
echo "  B=4 L=32768 Hq32/8 D128 fp8-per-head      {time}   3800.0   84.0%"
"""
# Lists its one test Fake.One for a filter of Fake.*, none for any other.
TESTS = """#!/usr/bin/env bash
if [ "$1" = --gtest_list_tests ]; then
  if [ "$2" = "--gtest_filter=Broken.*" ]; then
    echo "error while loading shared libraries"; exit 127
  fi
  [ "$2" = "--gtest_filter=Fake.*" ] && printf 'Fake.\\n  One\\n'
  exit 0
fi
echo "$0 $*" >>"$CALLS"
echo "[ RUN      ] Fake.One"
echo "[  {verdict}  ] {summary}"
{failed}
"""


def make_archive(tmp_path, variants):
    tree = tmp_path / "tree"
    (tree / "scripts").mkdir(parents=True)
    for name in ("gpu-ab-carried", "ab_rounds.py"):
        dst = tree / "scripts" / name
        dst.write_text(open(os.path.join(ROOT, "scripts", name)).read())
        dst.chmod(0o755)
    stage = tmp_path / "stage"
    for name, (time, tests) in variants.items():
        d = stage / name
        d.mkdir(parents=True)
        (d / "fp8kv").write_text(BENCH.format(time=time))
        (d / "fp8kv").chmod(0o755)
        if tests is not None:
            failed = "" if tests else 'echo "[  FAILED  ] Fake.One"'
            (d / "fp8kv_gpu_tests").write_text(
                TESTS.format(verdict="PASSED" if tests else "FAILED",
                             summary="1 test." if tests else "1 test, listed below:",
                             failed=failed))
            (d / "fp8kv_gpu_tests").chmod(0o755)
    (tree / "build-ncu").mkdir()
    with tarfile.open(tree / "build-ncu" / "ab.txz", "w:xz") as tar:
        tar.add(stage, arcname=".")
    return tree


def run(tree, tmp_path, *args, env=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    e = dict(os.environ, OUT=str(out), CALLS=str(calls), PATH=os.environ["PATH"])
    e.update(env or {})
    r = subprocess.run(["bash", str(tree / "scripts" / "gpu-ab-carried"), *args], cwd=tree,
                       env=e, capture_output=True, text=True, timeout=60)
    return r, out, calls


def test_rounds_in_turns_compared_with_the_first(tmp_path):
    tree = make_archive(tmp_path, {"A": ("70.0", None), "X": ("63.0", None)})
    r, out, calls = run(tree, tmp_path, "3", "--only decode --iters 20")
    assert r.returncode == 0, r.stderr
    order = [line.split("/")[-2] for line in calls.read_text().splitlines()]
    assert order == ["A", "X"] * 3
    assert all("bench kernels --no-gemm --only decode --iters 20" in line
               for line in calls.read_text().splitlines())
    assert "time -10.0%" in r.stdout and "[63,63,63]" in r.stdout.replace(".0", "")
    assert sorted(os.listdir(out)) == ["rounds.txt"]
    assert len(out.joinpath("rounds.txt").read_text().splitlines()) == 6


def test_tests_run_first_and_failures_are_named(tmp_path):
    tree = make_archive(tmp_path, {"A": ("70.0", None), "X": ("69.0", False), "Y": ("71.0", True)})
    r, _, _ = run(tree, tmp_path, "1", "--only decode", "A", "X", "Y",
                  env={"FP8KV_AB_TEST_FILTER": "Fake.*"})
    assert r.returncode == 0, r.stderr
    assert "X tests rc=0" in r.stdout and "[  FAILED  ] Fake.One" in r.stdout
    assert "Y tests rc=0: [  PASSED  ] 1 test." in r.stdout
    assert "A tests" not in r.stdout  # A carries no test binary
    assert r.stdout.index("Y tests") < r.stdout.index("A round 1")
    # ... and again after the rounds' table, the part of the output the device tool returns
    assert r.stdout.rindex("X tests rc=0") > r.stdout.index("time +")
    assert r.stdout.rstrip().endswith("Y tests rc=0: [  PASSED  ] 1 test.")


def test_bench_arguments_the_bench_refuses_stop_it_before_any_test(tmp_path):
    tree = make_archive(tmp_path, {"A": ("70.0", None), "X": ("69.0", True)})
    r, out, calls = run(tree, tmp_path, "2", "--only decode --decode-case NOPE",
                        env={"FP8KV_AB_TEST_FILTER": "Fake.*"})
    assert r.returncode == 2
    assert "A's bench refuses the arguments" in r.stderr and "no case 'NOPE'" in r.stderr
    assert not calls.exists()  # no test and no bench ran
    assert "tests rc" not in r.stdout


def test_a_test_filter_that_names_no_test_is_refused(tmp_path):
    tree = make_archive(tmp_path, {"A": ("70.0", None), "X": ("69.0", True)})
    r, _, calls = run(tree, tmp_path, "1", "--only decode",
                      env={"FP8KV_AB_TEST_FILTER": "CudaDecode.*"})
    assert r.returncode == 2
    assert "FP8KV_AB_TEST_FILTER='CudaDecode.*' names no test of X" in r.stderr
    assert not calls.exists()
    # a test binary that cannot list at all is named as such, not as a filter's miss
    r, _, calls = run(tree, tmp_path, "1", "--only decode",
                      env={"FP8KV_AB_TEST_FILTER": "Broken.*"})
    assert r.returncode == 2
    assert "X's fp8kv_gpu_tests cannot list its tests" in r.stderr
    assert "error while loading shared libraries" in r.stderr
    assert not calls.exists()


def test_a_variant_not_in_the_archive_is_refused(tmp_path):
    tree = make_archive(tmp_path, {"A": ("70.0", None)})
    r, _, calls = run(tree, tmp_path, "2", "--only decode", "A", "Z")
    assert r.returncode != 0
    assert "no Z/fp8kv in the archive" in r.stderr
    assert not calls.exists()
