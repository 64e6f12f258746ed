"""scripts/gpu_report.py, the last table of scripts/gpu-check: a benchmark JSON that the bench
wrote after each section (complete false: it died in a later one) still gives the finished
sections, under a note that says so; a complete one has no note; no JSON is an error."""
import json
import os
import subprocess
import sys

REPORT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "gpu_report.py")


def bench_json(complete):
    res = [{"kind": "ceiling", "name": "read", "gbs": 4500.0},
           {"kind": "ceiling", "name": "copy", "gbs": 4200.0}]
    for scheme, us in (("bf16", 260.0), ("fp8-per-tensor", 133.0), ("fp8-per-head", 132.0)):
        res.append({"kind": "decode", "name": "B64_L4096_" + scheme, "us": us,
                    "frac_read_bw": 0.9 * 132.0 / us})
    doc = {"device": "Test GPU", "results": res}
    if complete is not None:
        doc["complete"] = complete
    return doc


def run(tmp_path, doc):
    path = tmp_path / "bench.json"
    if doc is not None:
        path.write_text(json.dumps(doc))
    return subprocess.run([sys.executable, REPORT, str(path)], capture_output=True, text=True)


def test_incomplete_bench_reports_its_finished_sections_under_a_note(tmp_path):
    out = run(tmp_path, bench_json(False))
    assert out.returncode == 0, out.stderr
    assert "stopped early" in out.stdout
    assert "B64_L4096" in out.stdout and "132.0" in out.stdout


def test_complete_bench_has_no_note(tmp_path):
    for complete in (True, None):  # None: a JSON from before the flag
        out = run(tmp_path, bench_json(complete))
        assert out.returncode == 0, out.stderr
        assert "stopped early" not in out.stdout
        assert "B64_L4096" in out.stdout


def test_missing_json_is_an_error(tmp_path):
    out = run(tmp_path, None)
    assert out.returncode == 1
    assert "no benchmark JSON" in out.stdout


def test_a_runs_prefill_row_is_set_beside_the_peer_figure_of_its_shape(tmp_path):
    doc = bench_json(True)
    doc["results"] += [{"kind": "prefill", "name": f"B2_L8192{suffix}_{scheme}", "tflops": tf}
                       for suffix in ("", "_runs")
                       for scheme, tf in (("bf16", 600.0), ("fp8-per-tensor", 560.0),
                                          ("fp8-per-head", 760.0))]
    torch = {"torch": "x", "decode": {}, "prefill": {"B2_L8192": {"tflops": 650.0}}}
    (tmp_path / "torch.json").write_text(json.dumps(torch))
    (tmp_path / "bench.json").write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "bench.json"),
                          str(tmp_path / "torch.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("B2_L8192_runs"))
    assert "650" in row and "1.17" in row  # the peer's 650 and 760 / 650


def test_decode_rows_show_fp8_per_head_against_a_same_size_read_where_measured(tmp_path):
    doc = bench_json(True)
    for r in doc["results"]:
        if r["name"] == "B64_L4096_fp8-per-head":
            r["frac_same_size_read"] = 0.891
    out = run(tmp_path, doc)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("B64_L4096"))
    assert "89%" in row
    # A JSON from before the figure: the row is still printed, the figure as nan.
    out = run(tmp_path, bench_json(True))
    row = next(line for line in out.stdout.splitlines() if line.startswith("B64_L4096"))
    assert "nan%" in row


def prefill_doc(tflops):
    doc = bench_json(True)
    doc["results"] += [{"kind": "prefill", "name": f"B2_L8192_{scheme}", "tflops": tf}
                       for scheme, tf in zip(("bf16", "fp8-per-tensor", "fp8-per-head"), tflops)]
    doc["results"].append({"kind": "prefill", "name": "B2_L8192_bf16_ws", "tflops": 250.0})
    return doc


def test_sustained_figures_make_a_second_prefill_table_against_their_own_peer(tmp_path):
    files = {"bench.json": prefill_doc((630.0, 570.0, 790.0)),
             "torch.json": {"torch": "x", "decode": {}, "prefill": {"B2_L8192": {"tflops": 645.0}}},
             "s-bench.json": {"device": "Test GPU", "results": prefill_doc((616.0, 552.0, 770.0))["results"]},
             "s-torch.json": {"torch": "x", "decode": {}, "prefill": {"B2_L8192": {"tflops": 545.0}}}}
    for name, doc in files.items():
        (tmp_path / name).write_text(json.dumps(doc))
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "bench.json"),
                          str(tmp_path / "torch.json"), "--sustained",
                          str(tmp_path / "s-bench.json"), str(tmp_path / "s-torch.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("prefill sustained"))
    short = next(line for line in lines[:at] if line.startswith("B2_L8192"))
    assert "645" in short and "0.98" in short  # 630 / 645, the short run's peer
    sustained = lines[at + 1]
    assert sustained.startswith("B2_L8192")
    assert "545" in sustained and "1.13" in sustained  # 616 / 545, the sustained run's peer
    # The per-kernel lines belong to the short run's table only.
    assert sum("bf16 kernels: ws 250" in line for line in lines) == 1


def test_sustained_needs_two_paths_and_says_when_its_bench_json_is_missing(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(prefill_doc((630.0, 570.0, 790.0))))
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "bench.json"), "--sustained",
                          str(tmp_path / "s-bench.json")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "two JSON paths" in out.stdout
    out = subprocess.run([sys.executable, REPORT, str(tmp_path / "bench.json"), "--sustained",
                          str(tmp_path / "s-bench.json"), str(tmp_path / "s-torch.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no sustained benchmark JSON" in out.stdout
    assert "prefill sustained" not in out.stdout


def test_the_rest_before_the_first_prefill_row_is_said_only_when_there_was_one(tmp_path):
    torch = {"torch": "x", "decode": {}, "prefill": {"B2_L8192": {"tflops": 650.0}}}
    (tmp_path / "torch.json").write_text(json.dumps(torch))
    for ms, said in ((2000.0, True), (0.0, False), (None, False)):  # None: a JSON from before it
        doc = bench_json(True)
        doc["results"] += [{"kind": "prefill", "name": f"B2_L8192_{scheme}", "tflops": 700.0}
                           for scheme in ("bf16", "fp8-per-tensor", "fp8-per-head")]
        if ms is not None:
            doc["results"].append({"kind": "setting", "name": "prefill_rest", "ms": ms})
        (tmp_path / "bench.json").write_text(json.dumps(doc))
        out = subprocess.run([sys.executable, REPORT, str(tmp_path / "bench.json"),
                              str(tmp_path / "torch.json")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert ("after 2000 ms of rest" in out.stdout) == said, (ms, out.stdout)
