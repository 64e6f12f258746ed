// KV-scale formats of other engines that need only JSON (docs/FORMATS.md, "Other engines'
// formats"), and the one lossy step between granularities that convert takes when asked
// (--reduce max). The safetensors-based formats (vLLM / compressed-tensors, ModelOpt) live in
// the runtime layer: fp8kv/scale_tensors.h.
#pragma once

#include <string>

#include "fp8kv/calib.h"
#include "fp8kv/export.h"

namespace fp8kv {

// The quant-param JSON that vLLM and SGLang load with --quantization-param-path:
//   {"model_type": "llama", "kv_cache": {"dtype": "float8_e4m3fn",
//    "scaling_factor": {"<tp_rank>": {"<layer>": s, ...}, ...}}}
// One scale per layer for K and V together, listed once per tensor-parallel rank.
//
// Reads it into a per_tensor CalibData with k = v = s. The format has no architectures and no
// KV heads: they are taken from `expect` (empty / 0 when not given); expect.num_layers, when
// set, must match every rank's layer count (expect.quant_type is served either way: a per-head
// scheme takes the scales broadcast, scales_for_scheme). Ranks whose scales differ are refused
// (naming the rank, the layer and both values) unless `reduce_max`, which takes each layer's
// max over the ranks. `model_type`, when not null, gets the file's model_type ("" when absent
// or null). Throws Error naming `name`, the field and the value on every violation (same size
// and depth caps as load_calib).
FP8KV_API CalibData parse_quant_param_json(const std::string& text, const std::string& name,
                                           const CalibExpect& expect, bool reduce_max,
                                           std::string* model_type = nullptr);

// The text of a quant-param JSON for `tp` ranks (every rank listed, the same scales on each).
// `d` must be per_tensor (per_head: reduce it first) with no draft layers; the one scale of a
// layer is max(k, v). model_type "" writes null.
FP8KV_API std::string quant_param_json_text(const CalibData& d, const std::string& model_type,
                                            int tp);

// A per_head CalibData reduced to per_tensor: each layer's K scale is the max over its KV
// heads' K scales, V likewise. Exact where the heads agree; otherwise the heads with smaller
// scales lose resolution (that is the point of asking for it). q_scales are kept.
FP8KV_API CalibData reduce_to_per_tensor(const CalibData& d);

// Whether the JSON text is a quant-param JSON (a top-level object with "kv_cache") rather than
// a kv_cache_calib.json; parses with the same caps and refusals as load_calib.
FP8KV_API bool is_quant_param_json(const std::string& text, const std::string& name);

}  // namespace fp8kv
