#include "fp8kv/observer.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"

namespace fp8kv {
namespace {

class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  void all_gather(const float* in, float* out, size_t count) override {
    std::copy(in, in + count, out);
  }
  void all_reduce_max(float*, size_t) override {}
  void all_reduce_sum(float*, size_t) override {}
};

// Reads a non-negative integer from the environment variable `name`, if set.
std::optional<int> env_count(const char* name) {
  const char* text = std::getenv(name);
  if (text == nullptr) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*text == '\0' || *end != '\0' || errno != 0 || value < 0 || value > 1000000000L) {
    throw Error(std::string("environment variable ") + name + "='" + text +
                "' is not a non-negative integer");
  }
  return static_cast<int>(value);
}

// max that lets NaN win, so a non-finite K/V value cannot be hidden by a later finite one.
float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return NAN;
  return std::max(a, b);
}

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() {
  return std::make_unique<SingleCommunicator>();
}

namespace {

// `ours`, else the first of LightLLM's `theirs` that is set (those set must agree).
std::optional<CalibEnvSetting> setting_from_env(const char* ours,
                                                std::initializer_list<const char*> theirs) {
  if (const std::optional<int> v = env_count(ours)) {
    CalibEnvSetting out{*v, ours, ""};
    for (const char* name : theirs) {
      if (const char* text = std::getenv(name)) {
        out.ignored += (out.ignored.empty() ? "" : ", ") + std::string(name) + "=" + text;
      }
    }
    return out;
  }
  std::optional<CalibEnvSetting> lightllm;
  for (const char* name : theirs) {
    const std::optional<int> v = env_count(name);
    if (!v) continue;
    if (!lightllm) {
      lightllm = CalibEnvSetting{*v, name, ""};
    } else if (lightllm->value != *v) {
      throw Error("environment variables " + lightllm->variable + "=" +
                  std::to_string(lightllm->value) + " and " + name + "=" + std::to_string(*v) +
                  " (LightLLM's names for one setting) disagree; unset one, or set " + ours +
                  ", which wins over both");
    }
  }
  return lightllm;
}

}  // namespace

std::optional<CalibEnvSetting> calib_warmup_from_env() {
  return setting_from_env("FP8KV_CALIB_WARMUP", {"KV_QUANT_CALIBRATION_WARMUP_COUNT",
                                                 "LIGHTLLM_KV_QUANT_CALIBRATION_WARMUP_COUNT",
                                                 "LIGHTLLM_KV_QUANT_CALIBRARTION_WARMUP_COUNT"});
}

std::optional<CalibEnvSetting> calib_count_from_env() {
  return setting_from_env("FP8KV_CALIB_COUNT", {"KV_QUANT_CALIBRATION_INFERENCE_COUNT",
                                                "LIGHTLLM_KV_QUANT_CALIBRATION_INFERENCE_COUNT",
                                                "LIGHTLLM_KV_QUANT_CALIBRARTION_INFERENCE_COUNT"});
}

ObserverConfig observer_config_from_env(ObserverConfig base) {
  if (auto w = calib_warmup_from_env()) base.warmup = w->value;
  if (auto c = calib_count_from_env()) base.count = c->value;
  return base;
}

Observer::Observer(const ObserverConfig& config) : config_(config) {
  if (config.num_layers <= 0) {
    throw Error("observer: num_layers must be > 0, got " + std::to_string(config.num_layers));
  }
  if (config.num_kv_heads <= 0) {
    throw Error("observer: num_kv_heads must be > 0, got " + std::to_string(config.num_kv_heads));
  }
  if (config.warmup < 0 || config.count < 1) {
    throw Error("observer: warmup must be >= 0 and count >= 1, got warmup " +
                std::to_string(config.warmup) + ", count " + std::to_string(config.count));
  }
  if (config.q_scales && config.quant_type != QuantType::kPerHead) {
    throw Error(
        "observer: Q scales (q_calibration) are for per_head calibration (fp8-per-head quantizes "
        "Q), not per_tensor");
  }
  passes_.assign(config.num_layers, 0);
  amax_.assign(static_cast<size_t>(config.num_layers) * 2 * config.num_kv_heads, 0.0f);
  if (config.q_scales) {
    q_amax_.assign(static_cast<size_t>(config.num_layers) * config.num_kv_heads, 0.0f);
  }
}

bool Observer::wants(int layer) const {
  const int seen = passes_.at(layer);
  return seen >= config_.warmup && seen < config_.warmup + config_.count;
}

void Observer::record(int layer, const float* amax, const float* q_amax) {
  if (layer < 0 || layer >= config_.num_layers) {
    throw Error("observer: layer " + std::to_string(layer) + " out of range [0, " +
                std::to_string(config_.num_layers) + ")");
  }
  if (config_.q_scales && q_amax == nullptr) {
    throw Error("observer: layer " + std::to_string(layer) +
                ": the observer records Q scales and was given no Q abs-max");
  }
  if (wants(layer)) {
    const int width = 2 * config_.num_kv_heads;
    float* row = amax_.data() + static_cast<size_t>(layer) * width;
    for (int i = 0; i < width; ++i) row[i] = nan_max(row[i], std::fabs(amax[i]));
    if (config_.q_scales) {
      float* q_row = q_amax_.data() + static_cast<size_t>(layer) * config_.num_kv_heads;
      for (int i = 0; i < config_.num_kv_heads; ++i) {
        q_row[i] = nan_max(q_row[i], std::fabs(q_amax[i]));
      }
    }
  }
  ++passes_[layer];
}

bool Observer::done() const {
  return std::all_of(passes_.begin(), passes_.end(),
                     [&](int seen) { return seen >= config_.warmup + config_.count; });
}

int Observer::passes_seen(int layer) const { return passes_.at(layer); }

CalibData Observer::finalize(Communicator& comm, const std::string& architectures) const {
  const int layers = config_.num_layers;
  const int local_heads = config_.num_kv_heads;
  const int world = comm.world_size();
  CalibData out;
  out.architectures = architectures;
  out.quant_type = config_.quant_type;
  out.qmin = -kE4m3Max;
  out.qmax = kE4m3Max;
  out.num_layers = layers;

  // Global abs-max table: per_head [layers, 2 * H] in global head order, per_tensor [layers, 2].
  std::vector<float> global;
  if (config_.quant_type == QuantType::kPerHead) {
    // Rank r holds heads [r * h, (r + 1) * h) of the replicated head list, in which each
    // global head appears f = h * world / H times in a row: gather every rank's table, then
    // place its K and V heads into the global row (replicas merge by max; they saw the same).
    const int replicated = local_heads * world;
    const int total_heads = config_.total_kv_heads > 0 ? config_.total_kv_heads : replicated;
    if (replicated % total_heads != 0) {
      throw Error("observer: " + std::to_string(world) + " ranks x " + std::to_string(local_heads) +
                  " heads do not cover " + std::to_string(total_heads) + " KV heads evenly");
    }
    const int f = replicated / total_heads;
    std::vector<float> gathered(amax_.size() * world);
    comm.all_gather(amax_.data(), gathered.data(), amax_.size());
    global.assign(static_cast<size_t>(layers) * 2 * total_heads, 0.0f);
    for (int r = 0; r < world; ++r) {
      const float* rank_table = gathered.data() + r * amax_.size();
      for (int l = 0; l < layers; ++l) {
        const float* src = rank_table + static_cast<size_t>(l) * 2 * local_heads;
        float* dst = global.data() + static_cast<size_t>(l) * 2 * total_heads;
        for (int i = 0; i < local_heads; ++i) {
          const int head = (r * local_heads + i) / f;
          dst[head] = nan_max(dst[head], src[i]);
          dst[total_heads + head] = nan_max(dst[total_heads + head], src[local_heads + i]);
        }
      }
    }
    out.num_head = total_heads;
    if (config_.q_scales) {
      // The same placement for Q: a KV head held by f ranks has each rank's part of its group.
      std::vector<float> q_gathered(q_amax_.size() * world);
      comm.all_gather(q_amax_.data(), q_gathered.data(), q_amax_.size());
      std::vector<float> q_global(static_cast<size_t>(layers) * total_heads, 0.0f);
      for (int r = 0; r < world; ++r) {
        for (int l = 0; l < layers; ++l) {
          const float* src =
              q_gathered.data() + r * q_amax_.size() + static_cast<size_t>(l) * local_heads;
          float* dst = q_global.data() + static_cast<size_t>(l) * total_heads;
          for (int i = 0; i < local_heads; ++i) {
            const int head = (r * local_heads + i) / f;
            dst[head] = nan_max(dst[head], src[i]);
          }
        }
      }
      for (size_t i = 0; i < q_global.size(); ++i) {
        if (!std::isfinite(q_global[i])) {
          throw Error("calibration: layer " + std::to_string(i / total_heads) + ", Q of KV head " +
                      std::to_string(i % total_heads) + ": abs-max is not finite (" +
                      std::to_string(q_global[i]) + "); the model produced NaN or infinity in Q");
        }
      }
      QScales q;
      q.num_head = total_heads;
      q.scales.resize(q_global.size());
      std::transform(q_global.begin(), q_global.end(), q.scales.begin(),
                     [](float a) { return a > 0.0f ? a / kE4m3Max : 1.0f; });
      out.q_scales = std::move(q);
    }
  } else {
    // Per tensor: max over this rank's heads, then over ranks.
    global.assign(static_cast<size_t>(layers) * 2, 0.0f);
    for (int l = 0; l < layers; ++l) {
      const float* row = amax_.data() + static_cast<size_t>(l) * 2 * local_heads;
      for (int h = 0; h < local_heads; ++h) {
        global[2 * l] = nan_max(global[2 * l], row[h]);
        global[2 * l + 1] = nan_max(global[2 * l + 1], row[local_heads + h]);
      }
    }
    comm.all_reduce_max(global.data(), global.size());
    out.num_head = config_.total_kv_heads > 0 ? config_.total_kv_heads : local_heads * world;
  }

  const int width = static_cast<int>(global.size()) / layers;
  for (int l = 0; l < layers; ++l) {
    for (int c = 0; c < width; ++c) {
      const float a = global[static_cast<size_t>(l) * width + c];
      if (!std::isfinite(a)) {
        const bool is_v = c >= width / 2;
        const std::string what =
            config_.quant_type == QuantType::kPerHead
                ? std::string(is_v ? "V" : "K") + " head " + std::to_string(c % (width / 2))
                : std::string(is_v ? "V" : "K") + " (per tensor)";
        throw Error("calibration: layer " + std::to_string(l) + ", " + what +
                    ": abs-max is not finite (" + std::to_string(a) +
                    "); the model produced NaN or infinity in K/V");
      }
    }
  }
  out.scales.resize(global.size());
  std::transform(global.begin(), global.end(), out.scales.begin(),
                 [](float a) { return a > 0.0f ? a / kE4m3Max : 1.0f; });
  return out;
}

}  // namespace fp8kv
