"""scripts/ab-switches, gpu-ab's patches from a branch of compile-time switches: each variant's
patch is the branch's change with its switches set to 1 (or to the integer given as
MACRO=VALUE) and applies to the base; a switch the branch does not define as 0 (as an integer,
for a value), or a malformed variant, is refused by name and writes no patch."""
import os
import shutil
import subprocess

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "ab-switches")

BASE = "int f() { return 1; }\n"
BRANCH = """#ifndef FP8KV_A
#define FP8KV_A 0
#endif
#ifndef FP8KV_B
#define FP8KV_B 0
#endif
#ifndef FP8KV_N
#define FP8KV_N -1
#endif
int f() { return 1 + FP8KV_A + 2 * FP8KV_B + 4 * FP8KV_N; }
"""


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)


def make_repo(tmp_path):
    """A repository with main (src/f.h) and a branch `prep/x` that adds two switches."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(SCRIPT, repo / "scripts" / "ab-switches")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "src" / "f.h").write_text(BASE)
    git(repo, "add", "src")
    git(repo, "commit", "-qm", "base")
    git(repo, "checkout", "-qb", "prep/x")
    (repo / "src" / "f.h").write_text(BRANCH)
    git(repo, "commit", "-qam", "switches")
    git(repo, "checkout", "-q", "main")
    return repo


def run(repo, *args):
    return subprocess.run(["bash", str(repo / "scripts" / "ab-switches"), *args],
                          capture_output=True, text=True)


def applied(repo, patch):
    """src/f.h after `git apply` of the patch in a scratch copy of the work tree."""
    copy = repo.parent / "copy"
    shutil.copytree(repo, copy)
    git(copy, "apply", str(patch))
    text = (copy / "src" / "f.h").read_text()
    shutil.rmtree(copy)
    return text


def assert_refused(repo, cases):
    """Each (variant spec, message) alone: exit 1 with the message, and no patch written."""
    for spec, message in cases:
        r = run(repo, "prep/x", spec)
        assert r.returncode == 1, spec
        assert message in r.stderr, (spec, r.stderr)
    assert not (repo / "ab").exists()


def test_each_variant_sets_its_switches_and_only_those(tmp_path):
    repo = make_repo(tmp_path)
    r = run(repo, "prep/x", "a=FP8KV_A", "ab=FP8KV_A,FP8KV_B")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ab/a.diff", "ab/ab.diff"]
    a = applied(repo, repo / "ab" / "a.diff")
    assert "#define FP8KV_A 1" in a and "#define FP8KV_B 0" in a
    ab = applied(repo, repo / "ab" / "ab.diff")
    assert "#define FP8KV_A 1" in ab and "#define FP8KV_B 1" in ab
    assert "int f() { return 1 + FP8KV_A + 2 * FP8KV_B + 4 * FP8KV_N; }" in ab
    assert "#define FP8KV_N -1" in a and "#define FP8KV_N -1" in ab


def test_a_switch_takes_an_integer_value(tmp_path):
    repo = make_repo(tmp_path)
    r = run(repo, "prep/x", "n3=FP8KV_N=3,FP8KV_B=2", "neg=FP8KV_N=-4,FP8KV_A")
    assert r.returncode == 0, r.stderr
    n3 = applied(repo, repo / "ab" / "n3.diff")
    assert "#define FP8KV_N 3" in n3 and "#define FP8KV_B 2" in n3 and "#define FP8KV_A 0" in n3
    neg = applied(repo, repo / "ab" / "neg.diff")
    assert "#define FP8KV_N -4" in neg and "#define FP8KV_A 1" in neg


def test_a_bad_value_or_a_bare_switch_not_defined_as_0_is_refused(tmp_path):
    repo = make_repo(tmp_path)
    assert_refused(repo, (("n=FP8KV_N=x", "'x' (n, FP8KV_N) is not an integer"),
                          ("n=FP8KV_N=1.5", "'1.5' (n, FP8KV_N) is not an integer"),
                          ("n=FP8KV_N", "does not define FP8KV_N as 0 (variant n)"),
                          ("c=FP8KV_C=2", "does not define FP8KV_C as an integer (variant c)")))


def test_unknown_switch_is_refused_and_writes_nothing(tmp_path):
    repo = make_repo(tmp_path)
    r = run(repo, "prep/x", "a=FP8KV_A", "c=FP8KV_C")
    assert r.returncode == 1
    assert "does not define FP8KV_C as 0 (variant c)" in r.stderr
    assert not (repo / "ab").exists()  # not even the good variant's patch


def test_malformed_variants_are_refused_by_name(tmp_path):
    repo = make_repo(tmp_path)
    assert_refused(repo, (("a", "'a' is not VARIANT=MACRO"), ("a=", "'a=' is not VARIANT=MACRO"),
                          ("../a=FP8KV_A", "variant name '../a' is not a file name"),
                          ("a=FP8KV_A;rm", "'FP8KV_A;rm' (a) is not a macro name")))


def test_a_branch_without_changes_in_src_is_refused(tmp_path):
    repo = make_repo(tmp_path)
    r = run(repo, "main", "a=FP8KV_A")
    assert r.returncode == 1
    assert "main changes nothing in src/, include/, bench/ or tests/ against main" in r.stderr


def test_the_branch_change_to_bench_include_and_tests_travels_too(tmp_path):
    """The benchmark is built from bench/, the library's API from include/, the GPU tests gpu-ab
    runs from tests/: a branch that also teaches the bench a row, the API a field and the tests a
    case carries them."""
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "prep/x")
    for folder, name in (("bench", "b.cpp"), ("include", "api.h"), ("tests", "t.cpp")):
        (repo / folder).mkdir()
        (repo / folder / name).write_text("int rows() { return 2; }\n")
    (repo / "docs.md").write_text("not code\n")
    git(repo, "add", "bench", "include", "tests", "docs.md")
    git(repo, "commit", "-qm", "a bench row, a field, a test")
    git(repo, "checkout", "-q", "main")
    r = run(repo, "prep/x", "a=FP8KV_A")
    assert r.returncode == 0, r.stderr
    patch = (repo / "ab" / "a.diff").read_text()
    assert "+#define FP8KV_A 1" in patch
    for path in ("bench/b.cpp", "include/api.h", "tests/t.cpp"):
        assert f"+++ b/{path}" in patch
    assert "docs.md" not in patch
