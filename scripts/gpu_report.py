#!/usr/bin/env python3
"""Final table of scripts/gpu-check: fp8kv's benchmark JSON merged with the PyTorch peer's, each
target marked PASS or MISS; with --sustained, a second prefill table from the `sustained` stage
(both sides timed after about a second of load, at the card's power limit).
    python3 scripts/gpu_report.py BENCH_JSON [TORCH_JSON] [--sustained BENCH_JSON TORCH_JSON]"""
import json
import os
import sys


def load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def mark(ok):
    return "PASS" if ok else "MISS"


def prefill_table(res, torch, title, kernels):
    """The prefill rows of a benchmark's results beside the peer's figures; kernels: also list
    every built kernel's figure under its row."""
    # Prefill records: "<case>_<scheme>" (the default kernel) or "<case>_<scheme>_<config>"; a
    # non-causal case is named "<shape>_noncausal" in both JSONs, so it gets its own row, joined
    # with the peer's is_causal=False figure.
    rows = {}
    for r in res:
        if r["kind"] != "prefill":
            continue
        parts = r["name"].split("_")
        at = next((i for i, x in enumerate(parts) if x == "bf16" or x.startswith("fp8-")), None)
        if at is None:
            continue
        case, scheme, config = "_".join(parts[:at]), parts[at], "_".join(parts[at + 1:]) or "default"
        rows.setdefault(case, {})[(scheme, config)] = r
    if rows:
        print(f"{title:<34}{'bf16':>8}{'ptens':>8}{'phead':>8}{'torch':>8}"
              f"{'ph/t':>6}{'b/t':>6}{'pt/t':>6}  targets(main: phead >=800, bf16 and ptens >= torch)")
        main_case = next(iter(rows))
        for case, by in rows.items():
            tf = lambda scheme: by.get((scheme, "default"), {}).get("tflops", float("nan"))
            # A _runs row (consecutive slots) against the peer's dense K/V of the same shape.
            t = torch["prefill"].get(case.removesuffix("_runs"), {}).get("tflops", float("nan"))
            b16, pt, ph = tf("bf16"), tf("fp8-per-tensor"), tf("fp8-per-head")
            verdict = ""
            if case == main_case:
                verdict = mark(ph >= 800 and (t != t or (b16 >= t and pt >= t)))
            print(f"{case:<34}{b16:>8.0f}{pt:>8.0f}{ph:>8.0f}{t:>8.0f}"
                  f"{ph / t:>6.2f}{b16 / t:>6.2f}{pt / t:>6.2f}  {verdict}")
            if not kernels:
                continue
            for scheme in dict.fromkeys(sch for sch, _ in by):  # every built kernel, per scheme
                others = [f"{cfg} {r['tflops']:.0f}" for (sch, cfg), r in by.items()
                          if sch == scheme and cfg != "default"]
                if others:
                    print(f"{'':<34}{scheme} kernels: " + ", ".join(others))


def main():
    args = sys.argv[1:]
    sustained = None
    if "--sustained" in args:
        at = args.index("--sustained")
        sustained = args[at + 1:at + 3]
        if len(sustained) != 2:
            print("gpu_report: --sustained takes two JSON paths, the bench's and the peer's")
            return 2
        del args[at:at + 3]
    bench = load(args[0] if args else None)
    torch = load(args[1] if len(args) > 1 else None) or {"decode": {}, "prefill": {}}
    if bench is None:
        print("gpu_report: no benchmark JSON")
        return 1
    res = bench["results"]
    if not bench.get("complete", True):
        print("gpu_report: the benchmark stopped early (see bench.log): the sections below are those it finished")
    get = lambda kind, name: next((r for r in res if r["kind"] == kind and r["name"] == name), None)
    ceil = {r["name"]: r for r in res if r["kind"] == "ceiling"}
    print(f"== fp8kv kernels on {bench['device']} (torch peer: {torch.get('torch', 'n/a')})")
    print(f"ceilings: read {ceil['read']['gbs']:.0f} GB/s, copy {ceil['copy']['gbs']:.0f} GB/s, "
          f"GEMM bf16 {ceil.get('gemm_bf16', {}).get('tflops', float('nan')):.0f} / "
          f"fp8 {ceil.get('gemm_fp8', {}).get('tflops', float('nan')):.0f} TFLOP/s")
    print(f"{'decode':<34}{'bf16us':>8}{'ptens':>8}{'phead':>8}{'torch':>8}"
          f"{'b%BW':>6}{'pt%BW':>7}{'ph%BW':>7}{'ph/t':>6}{'pt/t':>6}{'ph%rd':>7}"
          f"  targets(all >=90%BW, fp8 <=0.55x torch)")
    # ph%rd: fp8-per-head against the read ceiling's kernel over as many bytes (the launch's ramp
    # and tail paid alike); absent from a JSON of a bench before that figure.
    names = []
    for r in res:
        if r["kind"] == "decode":
            base = r["name"].rsplit("_", 1)[0]
            if base not in names:
                names.append(base)
    for key in names:
        b16, pt, ph = (get("decode", f"{key}_{s}") for s in ("bf16", "fp8-per-tensor", "fp8-per-head"))
        t = torch["decode"].get(key, {}).get("us", float("nan"))
        ok = all(x["frac_read_bw"] >= 0.9 for x in (b16, pt, ph))
        if t == t:  # the peer measured this shape
            ok = ok and ph["us"] <= 0.55 * t and pt["us"] <= 0.55 * t
        print(f"{key:<34}{b16['us']:>8.1f}{pt['us']:>8.1f}{ph['us']:>8.1f}{t:>8.1f}"
              f"{100 * b16['frac_read_bw']:>5.0f}%{100 * pt['frac_read_bw']:>6.0f}%{100 * ph['frac_read_bw']:>6.0f}%"
              f"{ph['us'] / t:>6.2f}{pt['us'] / t:>6.2f}"
              f"{100 * ph.get('frac_same_size_read', float('nan')):>6.0f}%  {mark(ok)}")
    prefill_table(res, torch, "prefill (TFLOP/s)", kernels=True)
    rest = get("setting", "prefill_rest")
    if rest and rest["ms"] > 0:
        print(f"{'':<34}(the first row's schemes each after {rest['ms']:.0f} ms of rest, as the "
              "peer's first row starts on a rested card)")
    if sustained:
        sus_bench, sus_torch = load(sustained[0]), load(sustained[1])
        if sus_bench is None:
            print(f"gpu_report: no sustained benchmark JSON ({sustained[0]})")
        else:
            # The same kernels after about a second of load: the card at its power limit, its SM
            # clock below the boost that a short run keeps (the peer's SDPA timed the same way).
            prefill_table(sus_bench["results"], sus_torch or {"decode": {}, "prefill": {}},
                          "prefill sustained (TFLOP/s)", kernels=False)
    for r in (r for r in res if r["kind"] == "quantize"):
        same = r.get("frac_copy_same_size")
        same = f" ({100 * same:5.1f}% of a same-size copy)" if same is not None else ""
        # In a stream (launches back to back, as in a model's step) where the bench measured it:
        # the targets are judged there; a lone launch's figure also pays its launch latency.
        frac, obs = r["frac_copy_bw"], r["observe_overhead"]
        stream = ""
        if "frac_copy_bw_stream" in r:
            frac, obs = r["frac_copy_bw_stream"], r["observe_overhead_stream"]
            stream = f" | in a stream {100 * frac:5.1f}% copy, observe {100 * obs:+5.1f}%"
        print(f"quantize {r['name']:<38} {r['gbs']:6.0f} GB/s {100 * r['frac_copy_bw']:5.1f}% copy{same}  "
              f"observe {100 * r['observe_overhead']:+5.1f}%{stream}  targets(>=85%, <=5%): "
              f"{mark(frac >= 0.85 and obs <= 0.05)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
