#!/usr/bin/env python3
"""One decode step from Python vs the same call from C++: what the binding costs per call.

For each case, host microseconds per call of:
  python   fp8kv.decode_attention(...) (the public function, out= given) in a Python loop;
  c++      the same arguments checked once, then the backend's decode_attention repeated N times
           inside C++ (the binding's `_repeat`): the C++ caller's cost per call;
  binding  the Python call with `_repeat=0`: argument parsing, DLPack borrowing, device, stream
           and shape checks, and no kernel -- the binding's own share of `python`;
  gpu      (CUDA) GPU time per call from CUDA events.
Host times are enqueue times on CUDA (no sync inside the loop): when the GPU is the bottleneck
they approach the GPU time.

  PYTHONPATH=build-gpu/python python3 scripts/bench_python.py [--iters 200]   # torch CUDA (H200)
  PYTHONPATH=build/python python3 scripts/bench_python.py --cpu [--iters 20000]
      # CPU backend, a tiny decode (1 request, 1 token, 1 head, D 64), NumPy arrays and torch
      # CPU tensors when torch is installed: the binding's cost without a GPU.
"""
import argparse
import time

import numpy as np

import fp8kv


def per_call(fn, n, repeats=5):
    """Seconds per call: the best of `repeats` loops of n // repeats calls (the least disturbed
    by other processes)."""
    for _ in range(min(n, 100)):
        fn()
    k = max(1, n // repeats)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        best = min(best, (time.perf_counter() - t0) / k)
    return best


def measure(call, n, sync=lambda: None):
    raw = fp8kv._fp8kv.decode_attention
    bind = dict(call, _repeat=0)
    sync()
    t_py = per_call(lambda: fp8kv.decode_attention(**call), n)
    sync()
    t_bind = per_call(lambda: raw(**bind), n)
    sync()
    raw(**call, _repeat=10)
    sync()
    t_cpp = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        raw(**call, _repeat=n)
        t_cpp = min(t_cpp, (time.perf_counter() - t0) / n)  # enqueue time: before the sync
        sync()
    return t_py, t_cpp, t_bind


def header(extra=""):
    print(f"{'tensors':8} {'scheme':16} {'B':>4} {'seq':>6} {'python us':>10} {'c++ us':>8} "
          f"{'binding us':>11}{extra}")


def cpu(n):
    header()
    frameworks = ["numpy"]
    try:
        import torch  # noqa: F401

        frameworks.append("torch")
    except ImportError:
        pass
    for fw in frameworks:
        for scheme in ["fp8-per-tensor", "bf16"]:
            B, seq, hkv, hq, d = 1, 1, 1, 1, 64
            pool_dtype = np.uint8 if scheme != "bf16" else np.uint16
            a = dict(q=np.zeros((B, hq, d), np.uint16),
                     kv_buffer=np.zeros((B * seq + 1, 2 * hkv, d), pool_dtype),
                     req_to_token=np.arange(B * seq, dtype=np.int32).reshape(B, seq),
                     b_req_idx=np.arange(B, dtype=np.int32),
                     b_seq_len=np.full(B, seq, np.int32),
                     out=np.zeros((B, hq, d), np.uint16))
            if scheme != "bf16":
                a["k_scale"] = np.full(1, 0.01, np.float32)
                a["v_scale"] = a["k_scale"]
            if fw == "torch":
                import torch

                # NumPy's uint16 (bf16 bits) -> torch.bfloat16; the rest as is.
                a = {k: torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
                     if v.dtype == np.uint16 else torch.from_numpy(v) for k, v in a.items()}
            call = dict(a, scheme=scheme, max_seq_len=seq)
            t_py, t_cpp, t_bind = measure(call, n)
            print(f"{fw:8} {scheme:16} {B:>4} {seq:>6} {t_py * 1e6:10.2f} {t_cpp * 1e6:8.2f} "
                  f"{t_bind * 1e6:11.2f}")


def gpu(n):
    import torch

    header(f" {'gpu us':>8}")
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
            t_py, t_cpp, t_bind = measure(call, n, torch.cuda.synchronize)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fp8kv._fp8kv.decode_attention(**call, _repeat=n)
            end.record()
            end.synchronize()
            t_gpu = start.elapsed_time(end) / n * 1e-3
            print(f"{'torch':8} {scheme:16} {B:>4} {seq:>6} {t_py * 1e6:10.2f} {t_cpp * 1e6:8.2f} "
                  f"{t_bind * 1e6:11.2f} {t_gpu * 1e6:8.2f}")
    print("host times are enqueue times (no sync inside the loop); when the GPU is the bottleneck "
          "both approach the GPU time")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--cpu", action="store_true", help="the CPU backend (no GPU needed)")
    args = ap.parse_args()
    if args.cpu:
        cpu(args.iters or 20000)
    else:
        gpu(args.iters or 200)


if __name__ == "__main__":
    main()
