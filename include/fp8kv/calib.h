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

// Static Q scales (q_calibration), for the per-head scheme.
struct QScales {
  int num_head = 0;             // Q-scale heads over all ranks
  std::vector<float> scales;    // [num_layers, num_head]
};

// The content of kv_cache_calib.json: scales for every layer and every KV head of the whole
// model (all tensor-parallel ranks).
struct FP8KV_API CalibData {
  std::string version = "1.0";
  std::string architectures;    // config.json architectures[0]
  QuantType quant_type = QuantType::kPerHead;
  float qmin = -448.0f;
  float qmax = 448.0f;
  int num_layers = 0;
  int num_head = 0;             // KV heads over all ranks
  std::optional<int> num_target_layers;
  std::optional<int> num_draft_layers;
  // Row l: per_head -> K scales of heads 0..H-1 then V scales of heads 0..H-1;
  // per_tensor -> [k, v]. [num_layers, 2 * num_head] or [num_layers, 2].
  std::vector<float> scales;
  std::optional<QScales> q_scales;

  int row_width() const { return quant_type == QuantType::kPerHead ? 2 * num_head : 2; }
  float k_scale(int layer, int head) const;  // head ignored for per_tensor
  float v_scale(int layer, int head) const;
};

// What the loader checks the file against; unset fields are not checked.
struct CalibExpect {
  std::optional<std::string> architectures;
  std::optional<int> num_layers;      // the model's layers (num_target_layers when a draft is in)
  std::optional<int> num_kv_heads;    // over all ranks
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
  int heads_per_rank = 0;       // h = max(1, H / tp)
  // per_head: [num_layers, 2 * h] (K of the rank's heads, then V); per_tensor: [num_layers, 2].
  std::vector<float> kv;
  // Static Q scales for this rank, [num_layers, h], when the file has q_calibration.
  std::optional<std::vector<float>> q;
  const float* k_row(int layer) const { return kv.data() + layer * row_width(); }
  const float* v_row(int layer) const { return k_row(layer) + row_width() / 2; }
  int row_width() const { return quant_type == QuantType::kPerHead ? 2 * heads_per_rank : 2; }
};

// Slices the scales for rank `rank` of `tp`; throws Error when tp and H are incompatible.
FP8KV_API RankScales slice_for_rank(const CalibData& data, int tp, int rank);

}  // namespace fp8kv
