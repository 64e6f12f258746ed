#!/usr/bin/env python3
"""PyTorch peer for fp8kv's kernel benchmark: bf16 SDPA (cuDNN attention backend first) on the
decode and prefill shapes of `fp8kv bench kernels`. The peer reads a contiguous [B, Hkv, L, D]
cache (no slot gather), so it is the stronger side of the comparison. Decode: --warmup untimed
runs, then the median of --iters; prefill, as `fp8kv bench kernels` times its cases: the median of
max(5, --iters / 2) runs after --prefill-warmup ones. A long prefill warm-up puts the card at its
power limit, where the clock settles below its boost (the `sustained` stage of scripts/gpu-check).

    python3 scripts/bench_torch.py [--json FILE] [--iters 20] [--warmup 5] [--prefill-warmup 2]
                                   [--only decode|prefill] [--quick]
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def time_us(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def sdpa(q, k, v, causal, warmup, iters):
    """Fastest-preference order: the first backend that runs the shape wins."""
    errors = []
    for name, backend in BACKENDS:
        for gqa in (True, False):
            try:
                kk, vv = (k, v) if gqa else (k.repeat_interleave(q.shape[1] // k.shape[1], 1),
                                             v.repeat_interleave(q.shape[1] // v.shape[1], 1))
                with sdpa_kernel([backend]):
                    fn = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal,
                                                                enable_gqa=gqa)
                    fn()
                    torch.cuda.synchronize()
                    return time_us(fn, warmup, iters), name + ("" if gqa else "+repeat")
            except Exception as e:  # noqa: BLE001 - report and try the next backend
                errors.append(f"{name}{'' if gqa else '+repeat'}: {str(e).splitlines()[0][:80]}")
    raise RuntimeError("no SDPA backend ran: " + "; ".join(errors))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--prefill-warmup", type=int, default=2)
    ap.add_argument("--only", choices=("decode", "prefill"), help="one section only")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.iters < 1 or a.warmup < 0 or a.prefill_warmup < 0:
        ap.error("--iters must be at least 1, --warmup and --prefill-warmup not negative "
                 f"(got {a.iters}, {a.warmup}, {a.prefill_warmup})")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    Hq, Hkv, D = 32, 8, 128
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": {}, "prefill": {}}
    print(f"torch {torch.__version__} SDPA peer on {out['device']}")
    shapes = [(64, 4096), (4, 32768), (256, 1024)] if not a.quick else [(16, 2048), (2, 8192)]
    if a.only == "prefill":
        shapes = []
    if shapes:
        print("decode  Hq=32 Hkv=8 D=128   bf16 time_us   cache_GB/s   backend")
    for B, L in shapes:
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, L, D, device=dev, dtype=torch.bfloat16)
        try:
            us, name = sdpa(q, k, v, False, a.warmup, a.iters)
        except RuntimeError as e:
            print(f"  B={B} L={L}: {e}")
            continue
        gbs = B * L * Hkv * 2 * D * 2 / us * 1e-3
        print(f"  B={B:<4d} L={L:<6d}        {us:10.1f}   {gbs:10.0f}   {name}")
        out["decode"][f"B{B}_L{L}"] = {"us": us, "gbs": gbs, "backend": name}
        del q, k, v
    # Prefill: the shapes of `fp8kv bench kernels` (same record names): one length per batch,
    # causal, and the reference shape non-causal (suffix _noncausal); the cached-prefix batch has
    # no SDPA equivalent: not measured here.
    L0 = 8192 if not a.quick else 2048
    cases = [(f"B2_L{L0}", 2, L0, 32, 8, 128, True), (f"B2_L{L0}_noncausal", 2, L0, 32, 8, 128, False)]
    if a.only == "decode":
        cases = []
    elif not a.quick:
        cases += [(f"B{max(1, 16384 // L)}_L{L}", max(1, 16384 // L), L, 32, 8, 128, True)
                  for L in (1024, 4096, 16384, 32768)]
        cases += [("B2_L8192_D64", 2, 8192, 32, 8, 64, True), ("B2_L8192_D256", 2, 8192, 32, 8, 256, True),
                  ("B2_L8192_Hq28_Hkv4", 2, 8192, 28, 4, 128, True)]
    if cases:
        print("prefill (causal unless said)      bf16 time_us   TFLOP/s   backend")
    for name, B, L, hq, hkv, d, causal in cases:
        q = torch.randn(B, hq, L, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, hkv, L, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, hkv, L, d, device=dev, dtype=torch.bfloat16)
        try:
            us, backend = sdpa(q, k, v, causal, a.prefill_warmup, max(5, a.iters // 2))
            # (query, key) pairs per head, exactly: L (L + 1) / 2 causal, L^2 non-causal
            pairs = L * (L + 1) / 2 if causal else L * L
            tflops = 4.0 * B * hq * d * pairs / us * 1e-6
            print(f"  {name:<30} {us:10.1f}   {tflops:7.1f}   {backend}")
            out["prefill"][name] = {"us": us, "tflops": tflops, "backend": backend}
        except RuntimeError as e:
            print(f"  {name}: {e}")
        del q, k, v
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
