// KV scales kept as safetensors tensors (docs/FORMATS.md, "Other engines' formats"), and the
// one loader every command uses for --calib: a kv_cache_calib.json, a quant-param JSON, a
// .safetensors file of scale tensors, or a model folder that carries them.
//
// Tensor names, per layer N (float32; shape [1] per tensor, [num_kv_heads] per head):
//   vLLM / llm-compressor / compressed-tensors: model.layers.N.self_attn.k_scale, .v_scale
//   NVIDIA ModelOpt:  model.layers.N.self_attn.k_proj.k_scale,
//   model.layers.N.self_attn.v_proj.v_scale
// Each means what fp8kv's scales mean: real = fp8 * scale.
#pragma once

#include <string>

#include "fp8kv/calib.h"
#include "fp8kv/export.h"

namespace fp8kv {

enum class ScaleNaming { kVllm, kModelopt };
FP8KV_API const char* scale_naming_name(ScaleNaming n);  // "vllm-checkpoint" / "modelopt"

// A loaded set of scales and where they came from, for messages and inspect.
struct LoadedScales {
  CalibData data;      // num_head 0 / architectures "" where the source does not say
  std::string format;  // "lightllm", "quant-param-json", "vllm-checkpoint", "modelopt"
  std::string detail;  // e.g. "12 layers of tensors in 2 files; config.json kv_cache_scheme"
};

// Reads scales from `path`: a folder (scale tensors in its *.safetensors, the shards of its
// model.safetensors.index.json when there is one, plus its config.json), a .safetensors file,
// or a JSON file (quant-param JSON when it has "kv_cache", else kv_cache_calib.json via
// load_calib). What the source does not carry (KV heads, architectures, layers) is taken from
// `expect`; what it carries is checked against `expect`. `reduce_max` merges what cannot be
// kept apart (quant-param JSON ranks that disagree). Throws Error naming the file, the tensor
// or field, and the value, on anything a careful reader must not guess: a layer with a V scale
// but no K scale (or back), a layer missing, both namings for one scale, a shape that is
// neither [1] nor [num_kv_heads], a scale that is not finite and > 0, a config.json
// kv_cache_scheme that contradicts the tensors.
FP8KV_API LoadedScales load_kv_scales(const std::string& path, const CalibExpect& expect = {},
                                      bool reduce_max = false);

// Writes `d` as scale tensors into the .safetensors file `path` (atomically): per_head as
// [num_kv_heads], per_tensor as [1], float32, layer by layer, K then V. ModelOpt naming takes
// per_tensor only. Refuses draft layers and q_scales (the caller decides to drop them).
FP8KV_API void write_scale_tensors(const std::string& path, const CalibData& d, ScaleNaming naming);

// What write_vllm_checkpoint wrote, for the user.
struct CheckpointWritten {
  std::string config, tensors, index;    // paths; index empty when the model has none
  std::string strategy;                  // "tensor" or "attn_head"
  bool new_quantization_config = false;  // true: the model had none, a compressed-tensors one
                                         // holding only kv_cache_scheme was added
};

// A folder vLLM serves with calibrated scales: `out_dir`/kv_scales.safetensors (vLLM names),
// `out_dir`/config.json = model_dir's config.json with quantization_config.kv_cache_scheme set
// (docs/FORMATS.md lists the exact entry), and, when model_dir has
// model.safetensors.index.json, a copy of it with the scale tensors mapped to
// kv_scales.safetensors. Nothing else is written (weights, tokenizer: copy or link them). Each
// file appears atomically; config.json last. Refuses: out_dir being model_dir, a config whose
// layers / KV heads / architectures disagree with `d`, a quantization_config of another
// quant_method than compressed-tensors, a model that already carries KV scale tensors.
FP8KV_API CheckpointWritten write_vllm_checkpoint(const std::string& out_dir,
                                                  const std::string& model_dir, const CalibData& d);

}  // namespace fp8kv
