// KV scales in memory and the kv_cache_calib.json file (docs/FORMATS.md).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "fp8kv/export.h"
#include "fp8kv/scheme.h"

namespace fp8kv {

enum class QuantType { kPerHead, kPerTensor };
FP8KV_API const char* quant_type_name(QuantType t);  // "per_head" / "per_tensor"
// The scales a scheme's kernels read: per_head for fp8-per-head and fp8-per-head-bf16q,
// per_tensor for fp8-per-tensor; none (nullopt) for bf16 and fp8-e5m2, which take no scales.
// The per-head schemes also take a per_tensor file (quant_type_serves, scales_for_scheme).
inline std::optional<QuantType> calib_quant_type(KvScheme s) {
  switch (kv_scale_source(s)) {
    case KvScaleSource::kPerHead:
      return QuantType::kPerHead;
    case KvScaleSource::kPerTensor:
      return QuantType::kPerTensor;
    case KvScaleSource::kNone:
      break;
  }
  return std::nullopt;
}

// Whether scales of quant_type `file` serve a scheme that reads `wanted` scales: the same type,
// or per_tensor for a per-head scheme (each layer's K and V scale broadcast to every KV head:
// exact, and no value saturates, since a layer's scale is >= each head's amax / 448). Per_head
// scales for fp8-per-tensor would need a reduction, which is the user's choice (convert
// --reduce max), so they do not serve.
constexpr bool quant_type_serves(QuantType file, QuantType wanted) {
  return file == wanted || (file == QuantType::kPerTensor && wanted == QuantType::kPerHead);
}

// Static Q scales (q_calibration), for the per-head scheme.
struct QScales {
  int num_head = 0;           // Q-scale heads over all ranks
  std::vector<float> scales;  // [num_layers, num_head]
};

// Where a loaded file came from when it was in LightLLM's per-rank layout (FORMATS.md,
// "LightLLM's per-rank layout"): num_head was copies x the model's KV heads, each head's scale
// written once per rank that held it, and the loader merged the copies (max).
struct RankLayoutOrigin {
  int copies = 1;         // k: ranks per KV head (the file's num_head / the model's)
  int file_num_head = 0;  // num_head as written, k * H
  // The largest |a - b| between two copies of one scale, and where (per_head only; 0 when
  // every copy is identical). At most one float32 rounding step: the loader refuses more.
  float max_disagreement = 0.0f;
  int worst_layer = -1;   // -1: no disagreement
  int worst_column = -1;  // column of the merged row [K heads, V heads]
};

// The content of kv_cache_calib.json: scales for every layer and every KV head of the whole
// model (all tensor-parallel ranks).
struct FP8KV_API CalibData {
  std::string version = "1.0";
  std::string architectures;  // config.json architectures[0]
  QuantType quant_type = QuantType::kPerHead;
  float qmin = -448.0f;
  float qmax = 448.0f;
  int num_layers = 0;
  int num_head = 0;  // KV heads over all ranks
  std::optional<int> num_target_layers;
  std::optional<int> num_draft_layers;
  // Row l: per_head -> K scales of heads 0..H-1 then V scales of heads 0..H-1;
  // per_tensor -> [k, v]. [num_layers, 2 * num_head] or [num_layers, 2].
  std::vector<float> scales;
  std::optional<QScales> q_scales;
  // Set by the loader when it merged LightLLM's per-rank layout; never written to a file.
  std::optional<RankLayoutOrigin> rank_layout;

  int row_width() const { return quant_type == QuantType::kPerHead ? 2 * num_head : 2; }
  float k_scale(int layer, int head) const;  // head ignored for per_tensor
  float v_scale(int layer, int head) const;
};

// What the loader checks the file against; unset fields are not checked.
struct CalibExpect {
  std::optional<std::string> architectures;
  std::optional<int> num_layers;  // the model's layers (num_target_layers when a draft is in)
  // The model's KV heads over all ranks. The file's num_head must equal it, or be k times it
  // with each head repeated k times in LightLLM's rank order (merged on load, CalibData::
  // rank_layout says so); anything else is refused.
  std::optional<int> num_kv_heads;
  // The scales the scheme reads (calib_quant_type): the file's quant_type must serve it
  // (quant_type_serves); a per_tensor file for a per-head scheme loads as it is, per_tensor.
  std::optional<QuantType> quant_type;
};

// Reads and validates a calibration file. Throws Error naming the file, the field and both
// values (expected and found) on any violation of FORMATS.md's loading rules.
FP8KV_API CalibData load_calib(const std::string& path, const CalibExpect& expect = {});
// Same, from text already in memory; `name` stands for the file in messages.
FP8KV_API CalibData parse_calib(const std::string& text, const std::string& name,
                                const CalibExpect& expect = {});
// Writes atomically (temp file in the same folder + rename): an interrupted write leaves any
// old file intact. Values are printed so that they round-trip float32 exactly.
FP8KV_API void write_calib(const std::string& path, const CalibData& data);
FP8KV_API std::string calib_to_json(const CalibData& data);

// The scales one tensor-parallel rank uses for its KV heads (FORMATS.md, "Tensor parallelism").
struct RankScales {
  QuantType quant_type = QuantType::kPerHead;
  int num_layers = 0;
  int heads_per_rank = 0;  // h = max(1, H / tp)
  // per_head: [num_layers, 2 * h] (K of the rank's heads, then V); per_tensor: [num_layers, 2].
  std::vector<float> kv;
  // Static Q scales for this rank, [num_layers, h], when the file has q_calibration.
  std::optional<std::vector<float>> q;
  // per_head scales made by scales_for_scheme from a per_tensor file: every head of a layer
  // has the layer's scale. For messages ("broadcast from a per-tensor file").
  bool broadcast_from_per_tensor = false;
  const float* k_row(int layer) const { return kv.data() + layer * row_width(); }
  const float* v_row(int layer) const { return k_row(layer) + row_width() / 2; }
  int row_width() const { return quant_type == QuantType::kPerHead ? 2 * heads_per_rank : 2; }
};

// Slices the scales for rank `rank` of `tp`; throws Error when tp and H are incompatible.
FP8KV_API RankScales slice_for_rank(const CalibData& data, int tp, int rank);

// A per_tensor CalibData as per_head: each layer's K scale becomes the K scale of every one of
// its num_head KV heads, V likewise (exact; the reverse of kv_formats.h's reduce_to_per_tensor
// where the heads agree). Per_head data is returned as it is. Throws Error when num_head < 1 (a
// format without KV heads read without the model's).
FP8KV_API CalibData broadcast_to_per_head(const CalibData& data);

// The scales rank `rank` of `tp` uses for `scheme`: slice_for_rank of `data` in the granularity
// the scheme reads, a per_tensor `data` broadcast first for fp8-per-head and fp8-per-head-bf16q
// (broadcast_from_per_tensor set). Throws Error for a scheme without scales and for per_head
// data for fp8-per-tensor (naming `convert --reduce max`, which makes per-tensor scales of it).
FP8KV_API RankScales scales_for_scheme(const CalibData& data, KvScheme scheme, int tp, int rank);

// ---- LightLLM's per-rank layout (FORMATS.md) ------------------------------------------------
// LightLLM all-gathers each rank's KV-head scales in rank order: with tp ranks of h = max(1,
// H / tp) heads each, its file has num_head = h * tp, and when tp > H every head appears
// f = tp / H times in a row (tp 8 over 2 heads: K row [h0 h0 h0 h0 h1 h1 h1 h1], then V).
// For tp <= H the two layouts are the same file.

// The merged file (num_head = H, as calibrate writes by default) in LightLLM's per-rank layout
// for `tp` ranks: each head's scales repeated f times; per_tensor rows unchanged, num_head
// h * tp; q_calibration unchanged (it has its own num_head). Throws Error when tp and H do not
// divide one another.
FP8KV_API CalibData to_rank_layout(const CalibData& merged, int tp);

// The reverse: `data` with num_head = k * num_kv_heads (k >= 1) back to num_head =
// num_kv_heads, each group of k copies merged by max. Throws Error naming `name`, the layer,
// the head and the values when two copies differ by more than one float32 rounding step (a
// file whose columns are not each head repeated k times in rank order), or when num_head is
// not a multiple of num_kv_heads. Sets rank_layout when k > 1.
FP8KV_API CalibData merge_rank_layout(const CalibData& data, int num_kv_heads,
                                      const std::string& name);

// The largest k > 1 such that every run of k adjacent columns of the K half and of the V half
// holds copies of one value (within a float32 rounding step), in every layer; 1 when there is
// none. A hint for a file read without the model's KV heads: it may be LightLLM's per-rank
// layout of num_head / k heads (or a model whose heads happen to agree).
FP8KV_API int apparent_rank_copies(const CalibData& data);

}  // namespace fp8kv
