#!/usr/bin/env python3
"""Final table of scripts/gpu-check: fp8kv's benchmark JSON merged with the PyTorch peer's, each
target marked PASS or MISS.   python3 scripts/gpu_report.py BENCH_JSON [TORCH_JSON]"""
import json
import os
import sys


def load(path):
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main():
    bench = load(sys.argv[1] if len(sys.argv) > 1 else None)
    torch = load(sys.argv[2] if len(sys.argv) > 2 else None) or {"decode": {}, "prefill": {}}
    if bench is None:
        print("gpu_report: no benchmark JSON")
        return 1
    res = bench["results"]
    get = lambda kind, name: next((r for r in res if r["kind"] == kind and r["name"] == name), None)
    ceil = {r["name"]: r for r in res if r["kind"] == "ceiling"}
    mark = lambda ok: "PASS" if ok else "MISS"
    print(f"== fp8kv kernels on {bench['device']} (torch peer: {torch.get('torch', 'n/a')})")
    print(f"ceilings: read {ceil['read']['gbs']:.0f} GB/s, copy {ceil['copy']['gbs']:.0f} GB/s, "
          f"GEMM bf16 {ceil.get('gemm_bf16', {}).get('tflops', float('nan')):.0f} / "
          f"fp8 {ceil.get('gemm_fp8', {}).get('tflops', float('nan')):.0f} TFLOP/s")
    print(f"{'decode Hq32 Hkv8 D128':<22}{'bf16us':>8}{'ptens':>8}{'phead':>8}{'torch':>8}"
          f"{'bf16/t':>7}{'ph/t':>6}{'ph%BW':>7}{'pt%BW':>7}{'ph/bf':>6}  targets(>=70%BW, <=0.6x)")
    shapes = sorted({(int(r["B"]), int(r["L"])) for r in res if r["kind"] == "decode"}, key=lambda s: -s[0] * s[1])
    for B, L in shapes:
        key = f"B{B}_L{L}"
        b16, pt, ph = (get("decode", f"{key}_{s}") for s in ("bf16", "fp8-per-tensor", "fp8-per-head"))
        t = torch["decode"].get(key, {}).get("us", float("nan"))
        ok = ph["frac_read_bw"] >= 0.7 and pt["frac_read_bw"] >= 0.7 and ph["ratio_bf16"] <= 0.6 and pt["ratio_bf16"] <= 0.6
        print(f"B={B:<4d} L={L:<10d}{b16['us']:>8.1f}{pt['us']:>8.1f}{ph['us']:>8.1f}{t:>8.1f}"
              f"{b16['us'] / t:>7.2f}{ph['us'] / t:>6.2f}{100 * ph['frac_read_bw']:>6.0f}%{100 * pt['frac_read_bw']:>6.0f}%"
              f"{ph['ratio_bf16']:>6.2f}  {mark(ok)}")
    pre = [r for r in res if r["kind"] == "prefill"]
    if pre:
        tp = next(iter(torch["prefill"].values()), {})
        print(f"prefill causal B2 L{int(pre[0]['L'])}: " + ", ".join(
            f"{r['name'].split('_')[-1]} {r['tflops']:.0f} TFLOP/s ({100 * r['frac_gemm']:.0f}% GEMM)" for r in pre)
            + f", torch bf16 {tp.get('tflops', float('nan')):.0f} TFLOP/s ({tp.get('backend', 'n/a')})")
        ph = next((r for r in pre if r["name"].endswith("fp8-per-head")), None)
        if ph:
            print(f"  target fp8-per-head >= 400 TFLOP/s: {mark(ph['tflops'] >= 400)}")
    for r in (r for r in res if r["kind"] == "quantize"):
        print(f"quantize {r['name']:<24} {r['gbs']:6.0f} GB/s {100 * r['frac_copy_bw']:5.1f}% copy  "
              f"observe {100 * r['observe_overhead']:+5.1f}%  targets(>=70%, <=10%): "
              f"{mark(r['frac_copy_bw'] >= 0.7 and r['observe_overhead'] <= 0.10)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
