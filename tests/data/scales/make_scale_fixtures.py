#!/usr/bin/env python3
"""Writes the scale-format fixtures of tests/data/scales (run from anywhere; no torch needed).

Each bad_* fixture breaks exactly one rule of docs/FORMATS.md, "Other engines' formats"; the
tests (tests/core/kv_formats_test.cpp, tests/runtime/scale_tensors_test.cpp) check the message.
Safetensors files are written by hand: 8-byte little-endian header length, JSON header, data.
"""
import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, values); dtype F32 or BF16 (values as floats)."""
    header, data = {}, b""
    for name, dtype, shape, values in tensors:
        if dtype == "F32":
            raw = struct.pack("<%df" % len(values), *values)
        else:  # BF16: the top half of the float32 bits (values chosen to be exact)
            raw = b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", v))[0])[2:]
                           for v in values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def vllm(layer, kind):
    return "model.layers.%d.self_attn.%s_scale" % (layer, kind)


def modelopt(layer, kind):
    return "model.layers.%d.self_attn.%s_proj.%s_scale" % (layer, kind, kind)


def folder(name, config, files, index=None):
    path = os.path.join(HERE, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    for file_name, tensors in files.items():
        safetensors(os.path.join(path, file_name), tensors)
    if index is not None:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": index}, f, indent=2)


def config(layers=2, kv_heads=2, scheme=None):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": kv_heads}
    if scheme is not None:
        c["quantization_config"] = {"quant_method": "compressed-tensors", "kv_cache_scheme": scheme}
    return c


def scheme(strategy="tensor", **overrides):
    s = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False}
    s.update(overrides)
    return s


def per_head(names=vllm, layers=2):
    out = []
    for l in range(layers):
        out.append((names(l, "k"), "F32", [2], [0.01 * (l + 1), 0.02 * (l + 1)]))
        out.append((names(l, "v"), "F32", [2], [0.003 * (l + 1), 0.004 * (l + 1)]))
    return out


def main():
    j = lambda name, obj: open(os.path.join(HERE, name), "w").write(
        obj if isinstance(obj, str) else json.dumps(obj, indent=2) + "\n")
    # ---- quant-param JSON ----
    ok = {"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {
        "0": {"0": 0.0125, "1": 0.5}, "1": {"0": 0.0125, "1": 0.5}}}}
    j("ok_quant_param_tp2.json", ok)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["dtype"] = "float8_e5m2"
    j("bad_qp_dtype.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"] = {"0": ok["kv_cache"]["scaling_factor"]["0"], "2": ok["kv_cache"]["scaling_factor"]["0"]}
    j("bad_qp_missing_rank.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["rank1"] = bad["kv_cache"]["scaling_factor"].pop("1")
    j("bad_qp_rank_key.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["1"] = {"0": 0.0125, "2": 0.5}
    j("bad_qp_layer_gap.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["1"] = {"0": 0.0125}
    j("bad_qp_layer_count.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["1"]["1"] = 0.0
    j("bad_qp_scale_zero.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["0"]["1"] = "0.5"
    j("bad_qp_scale_string.json", bad)
    bad = json.loads(json.dumps(ok)); bad["kv_cache"]["scaling_factor"]["1"]["0"] = 0.025
    j("bad_qp_ranks_disagree.json", bad)
    j("bad_qp_kv_cache_missing.json", {"model_type": "llama"})
    j("bad_qp_no_ranks.json", {"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {}}})
    j("bad_qp_duplicate_key.json",
      '{"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": 0.5, "0": 1.0}}}}\n')
    j("bad_qp_nan.json",
      '{"kv_cache": {"dtype": "float8_e4m3fn", "scaling_factor": {"0": {"0": NaN}}}}\n')
    j("bad_qp_deep_nesting.json", '{"kv_cache": ' + "[" * 100 + "]" * 100 + "}\n")

    # ---- scale tensors ----
    st = lambda name, tensors: safetensors(os.path.join(HERE, name), tensors)
    st("ok_vllm_per_head.safetensors", per_head(vllm))
    st("ok_modelopt_per_tensor.safetensors",
       [(modelopt(l, kv), "F32", [1], [0.001 * (l + 1) + (0.0005 if kv == "v" else 0)])
        for l in range(2) for kv in "kv"])
    st("ok_vllm_bf16_scalar.safetensors",
       [(vllm(l, kv), "BF16", [], [0.5 if kv == "k" else 0.25]) for l in range(2) for kv in "kv"])
    st("bad_missing_layer.safetensors", [t for t in per_head(vllm, 3) if ".1." not in t[0]])
    st("bad_mixed_naming.safetensors", per_head(vllm, 1) + [t for t in per_head(modelopt, 2) if ".1." in t[0]])
    st("bad_shape_2d.safetensors", [(vllm(0, "k"), "F32", [2, 1], [0.1, 0.2]), (vllm(0, "v"), "F32", [2, 1], [0.1, 0.2])])
    st("bad_shape_mismatch.safetensors", [(vllm(0, "k"), "F32", [2], [0.1, 0.2]), (vllm(0, "v"), "F32", [1], [0.1])])
    st("bad_scale_zero.safetensors", [(vllm(0, "k"), "F32", [2], [0.1, 0.0]), (vllm(0, "v"), "F32", [2], [0.1, 0.2])])
    st("bad_scale_nan.safetensors", [(vllm(0, "k"), "F32", [1], [0.1]), (vllm(0, "v"), "F32", [1], [float("nan")])])
    st("bad_scale_negative.safetensors", [(vllm(0, "k"), "F32", [1], [-0.1]), (vllm(0, "v"), "F32", [1], [0.1])])
    st("bad_no_scales.safetensors", [("model.embed_tokens.weight", "F32", [2], [1.0, 2.0])])
    with open(os.path.join(HERE, "bad_truncated.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", 1000) + b'{"a": 1}')

    # ---- folders ----
    folder("bad_only_v_scale", config(), {"model.safetensors": [t for t in per_head(vllm) if "v_scale" in t[0]]})
    folder("bad_strategy_mismatch", config(scheme=scheme("attn_head")),
           {"model.safetensors": [(vllm(l, kv), "F32", [1], [0.5]) for l in range(2) for kv in "kv"]})
    folder("bad_scheme_bits", config(scheme=scheme(num_bits=4)), {"model.safetensors": per_head(vllm)})
    folder("bad_scheme_dynamic", config(scheme=scheme("attn_head", dynamic=True)), {"model.safetensors": per_head(vllm)})
    folder("bad_heads_mismatch", config(kv_heads=4), {"model.safetensors": per_head(vllm)})
    folder("bad_layer_beyond_model", config(layers=1), {"model.safetensors": per_head(vllm)})
    folder("bad_duplicate_files", config(), {"a.safetensors": per_head(vllm), "b.safetensors": per_head(vllm)[:1]})
    tensors = per_head(vllm)
    folder("ok_index_folder", config(scheme=scheme("attn_head")),
           {"model-00001-of-00002.safetensors": tensors[:2], "model-00002-of-00002.safetensors": tensors[2:]},
           index={t[0]: "model-0000%d-of-00002.safetensors" % (1 if i < 2 else 2) for i, t in enumerate(tensors)})


if __name__ == "__main__":
    main()
