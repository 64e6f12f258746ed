#!/usr/bin/env python3
"""One decode step from Python vs the same call from C++ (needs torch and a Hopper GPU).

For each batch: the host time per call of fp8kv.decode_attention called from a Python loop, of
the same call repeated inside C++ (the binding's `_repeat`: argument checks once, then the
backend's decode_attention N times), and the GPU time per call (CUDA events). The difference of
the first two is what the binding costs per call.
  PYTHONPATH=build-gpu/python python3 scripts/bench_python.py [--iters 200]
"""
import argparse
import time

import torch

import fp8kv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    n = args.iters
    print(f"{'scheme':16} {'B':>4} {'seq':>6} {'python us/call':>15} {'c++ us/call':>12} "
          f"{'gpu us/call':>12}")
    for scheme in ["fp8-per-tensor", "bf16"]:
        for B, seq in [(1, 1024), (32, 4096), (128, 8192)]:
            hkv, hq, d = 8, 64, 128
            dtype = torch.uint8 if scheme != "bf16" else torch.bfloat16
            pool = torch.randint(0, 100, (B * seq + 1, 2 * hkv, d), device="cuda").to(dtype)
            table = torch.arange(B * seq, dtype=torch.int32, device="cuda").view(B, seq)
            req = torch.arange(B, dtype=torch.int32, device="cuda")
            sl = torch.full((B,), seq, dtype=torch.int32, device="cuda")
            q = torch.randn(B, hq, d, device="cuda").to(torch.bfloat16)
            out = torch.empty_like(q)
            ks = vs = torch.full((1,), 0.01, device="cuda") if scheme != "bf16" else None
            call = dict(q=q, kv_buffer=pool, req_to_token=table, b_req_idx=req, b_seq_len=sl,
                        out=out, scheme=scheme, k_scale=ks, v_scale=vs, max_seq_len=seq)
            raw = fp8kv._fp8kv.decode_attention
            for _ in range(10):
                raw(**call)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                raw(**call)
            t_py = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            raw(**call, _repeat=n)
            t_cpp = (time.perf_counter() - t0) / n
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            raw(**call, _repeat=n)
            end.record()
            end.synchronize()
            t_gpu = start.elapsed_time(end) / n * 1e-3
            print(f"{scheme:16} {B:>4} {seq:>6} {t_py * 1e6:15.2f} {t_cpp * 1e6:12.2f} "
                  f"{t_gpu * 1e6:12.2f}")
    print("host times are enqueue times (no sync inside the loop); when the GPU is the bottleneck "
          "both approach the GPU time")


if __name__ == "__main__":
    main()
