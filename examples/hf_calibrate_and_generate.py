#!/usr/bin/env python3
"""Calibrate a (randomly initialised) transformers model with fp8kv and generate with its K/V in
an fp8kv FP8 pool. Needs a Hopper GPU, torch and transformers, and the module on the path:

  PYTHONPATH=build/python python3 examples/hf_calibrate_and_generate.py [--model llama|qwen2]

Prints the calibration file's first scales and the greedy tokens of transformers' own bf16
generation next to fp8kv's bf16 and FP8 ones.
"""
import argparse
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import fp8kv
import fp8kv.hf


def build(kind):
    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(cfg)
    # Not model.to(...): that would round RoPE's inv_freq to bf16 as well.
    return fp8kv.hf.cast(model, device="cuda", dtype=torch.bfloat16).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    ap.add_argument("--scheme", default="fp8-per-head")
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    model = build(args.model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [torch.randint(0, 1024, (2, 64), device="cuda", generator=gen) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kv_cache_calib.json")
        quant = "per-head" if args.scheme == "fp8-per-head" else "per-tensor"
        calib = fp8kv.hf.calibrate(model, batches, scheme=quant, count=8, out=path)
        print(f"calibration: {calib}; layer 0 scales {calib.scales[0][:4]} ...")
        prompt = torch.randint(0, 1024, (1, 32), device="cuda", generator=gen)
        kw = dict(max_new_tokens=args.tokens, do_sample=False)
        ours_fp8 = fp8kv.hf.generate(model, prompt, calib=path, scheme=args.scheme, **kw)
        ours_bf16 = fp8kv.hf.generate(model, prompt, scheme="bf16", **kw)
        theirs = model.generate(prompt, **kw)
    n = prompt.shape[1]
    print("transformers bf16:", theirs[0, n:].tolist())
    print("fp8kv bf16:       ", ours_bf16[0, n:].tolist())
    print(f"fp8kv {args.scheme}:", ours_fp8[0, n:].tolist())


if __name__ == "__main__":
    main()
