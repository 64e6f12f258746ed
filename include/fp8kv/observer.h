// The calibration observer (docs/DESIGN.md, "The workflow the user runs", step 1); it finalizes
// through a Communicator (fp8kv/communicator.h).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fp8kv/calib.h"
#include "fp8kv/communicator.h"
#include "fp8kv/export.h"

namespace fp8kv {

struct ObserverConfig {
  int num_layers = 0;
  int num_kv_heads = 0;  // KV heads of this rank
  // KV heads of the whole model; 0 means num_kv_heads * world size. Smaller than that when
  // ranks outnumber KV heads and heads are replicated (FORMATS.md, "Tensor parallelism").
  int total_kv_heads = 0;
  QuantType quant_type = QuantType::kPerHead;
  int warmup = 0;    // forward passes each layer skips first
  int count = 4000;  // forward passes each layer then observes
  // Also observe Q (post-RoPE, as attention reads it) per (layer, KV head): the abs-max over the
  // query heads of the head's GQA group, same passes as K/V; finalize writes q_calibration
  // (static Q scales of fp8-per-head). Per head only.
  bool q_scales = false;
};

// A warmup or count taken from the environment, and which variable gave it.
struct CalibEnvSetting {
  int value = 0;
  std::string variable;  // the variable used, e.g. "FP8KV_CALIB_COUNT"
  // "NAME=text" of LightLLM variables that were set too but lost to ours (empty: none).
  std::string ignored;
};

// The warmup / count from the environment: FP8KV_CALIB_WARMUP / FP8KV_CALIB_COUNT, else
// LightLLM's names for them, newest first: KV_QUANT_CALIBRATION_{WARMUP,INFERENCE}_COUNT,
// LIGHTLLM_KV_QUANT_CALIBRATION_..., LIGHTLLM_KV_QUANT_CALIBRARTION_... (misspelled as LightLLM
// spells it). Ours win when both are set; two LightLLM names set to different values throw
// Error naming both, as does a value that is not a non-negative integer.
FP8KV_API std::optional<CalibEnvSetting> calib_warmup_from_env();
FP8KV_API std::optional<CalibEnvSetting> calib_count_from_env();

// Warmup / count defaults with calib_warmup_from_env / calib_count_from_env applied.
FP8KV_API ObserverConfig observer_config_from_env(ObserverConfig base);

class FP8KV_API Observer {
 public:
  explicit Observer(const ObserverConfig& config);

  const ObserverConfig& config() const { return config_; }
  // True while layer `layer`'s next pass should be observed (past warmup, before count).
  bool wants(int layer) const;
  // Records one forward pass of one layer. `amax` is [2 * Hkv] (K heads then V heads) abs-max
  // of everything written in that pass; with ObserverConfig::q_scales, `q_amax` is [Hkv], the
  // abs-max of that pass's Q per KV head's group (required then, ignored otherwise). Passes
  // during warmup are counted and dropped.
  void record(int layer, const float* amax, const float* q_amax = nullptr);
  // Every layer has its count.
  bool done() const;
  int passes_seen(int layer) const;

  // Reduces over ranks (per-head: gathers heads into global order; per-tensor: max), checks
  // that every value is finite (Error names the layer and the head otherwise), and returns
  // scale = amax / 448 (0 -> 1), and the Q scales the same way (q_scales; a KV head held by
  // several ranks takes the max of their parts of its group). Every rank gets the same result.
  CalibData finalize(Communicator& comm, const std::string& architectures) const;

 private:
  ObserverConfig config_;
  std::vector<int> passes_;    // [num_layers] passes seen (warmup included)
  std::vector<float> amax_;    // [num_layers, 2 * Hkv]
  std::vector<float> q_amax_;  // [num_layers, Hkv] (q_scales), else empty
};

}  // namespace fp8kv
