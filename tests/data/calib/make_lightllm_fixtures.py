#!/usr/bin/env python3
"""Writes the lightllm_*.json fixtures of tests/core/calib_test.cpp the way LightLLM writes its
kv_cache_calib.json: scales computed in float32 (abs-max / 448, 0 -> 1), turned into Python
floats (a float32 tensor's .tolist(): the float32 value as a double), and json.dump(..., indent=4),
so every number is Python's repr of a float32. Standard library only: struct stands in for numpy.

Run from this folder: python3 make_lightllm_fixtures.py
"""
import json
import struct


def f32(x):
    """x rounded to float32, as a Python float (what float(np.float32(x)) gives)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def next_f32(x):
    """The next float32 above x (x > 0), as a Python float."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    return struct.unpack("<f", struct.pack("<I", bits + 1))[0]


QMAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max, a Python float


def scale(amax):
    return f32(f32(amax) / QMAX) if amax > 0 else 1.0


# Abs-max per layer of the model's 2 KV heads: K h0, K h1, V h0, V h1.
AMAX = [[3.71, 12.5, 0.913, 0.0], [7.25, 2.0625, 1.37, 0.442]]


def rank_layout(layer_amax, heads, ranks):
    """LightLLM's all-gather of per-rank K and V scales: rank r (h = max(1, heads / ranks) heads)
    writes heads r*h .. in order; with ranks > heads, rank r holds head r * heads // ranks."""
    h = max(1, heads // ranks)
    k, v = [], []
    for r in range(ranks):
        for i in range(h):
            head = (r * h + i) * heads // (h * ranks)
            k.append(scale(layer_amax[head]))
            v.append(scale(layer_amax[heads + head]))
    return k + v


def old_exporter(name, scales, num_head):
    """offline_fp8_quant_mem_manager.py's fields (per_head only, no draft fields)."""
    cfg = {
        "version": "1.0",
        "architectures": "LlamaForCausalLM",
        "quant_type": "per_head",
        "qmin": -QMAX,
        "qmax": QMAX,
        "num_layers": len(scales),
        "num_head": num_head,
        "scales_shape": [len(scales), len(scales[0])],
        "scales": scales,
    }
    with open(name, "w") as f:
        json.dump(cfg, f, indent=4)


def main():
    # tp 8 over 2 KV heads: K [h0 h0 h0 h0 h1 h1 h1 h1], then V the same.
    tp8 = [rank_layout(layer, 2, 8) for layer in AMAX]
    old_exporter("lightllm_tp8_kv2_per_head.json", tp8, 8)

    # tp 4 over 2 KV heads, and one copy of layer 1's V h0 one float32 step above the other
    # (accepted: the loader takes the max and inspect shows the step).
    tp4 = [rank_layout(layer, 2, 4) for layer in AMAX]
    tp4[1][4 + 1] = next_f32(tp4[1][4 + 1])
    old_exporter("lightllm_tp4_kv2_one_step.json", tp4, 4)

    # Copies that disagree: layer 0's K h1 on rank 6 is another value (refused).
    bad = [list(row) for row in tp8]
    bad[0][6] = scale(12.75)
    old_exporter("bad_lightllm_copies_disagree.json", bad, 8)

    # The heads tiled ([h0 h1 h0 h1]) instead of in rank order ([h0 h0 h1 h1]): refused.
    tiled = []
    for layer in AMAX:
        k = [scale(layer[0]), scale(layer[1])] * 2
        v = [scale(layer[2]), scale(layer[3])] * 2
        tiled.append(k + v)
    old_exporter("bad_lightllm_tiled_order.json", tiled, 4)

    # The newer exporter, per_tensor at tp 4 over 2 KV heads: num_head 4, one [k, v] per layer.
    per_tensor = [[scale(max(layer[0], layer[1])), scale(max(layer[2], layer[3]))]
                  for layer in AMAX]
    cfg = {
        "version": "1.0",
        "architectures": "LlamaForCausalLM",
        "quant_type": "per_tensor",
        "qmin": -QMAX,
        "qmax": QMAX,
        "num_layers": 2,
        "num_target_layers": 2,
        "num_draft_layers": 0,
        "num_head": 4,
        "scales_shape": [2, 2],
        "scales": per_tensor,
    }
    with open("lightllm_tp4_kv2_per_tensor.json", "w") as f:
        json.dump(cfg, f, indent=4)


if __name__ == "__main__":
    main()
