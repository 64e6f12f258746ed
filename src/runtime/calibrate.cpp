// calibrate(): the model over token data with a bf16 cache and an observer.
#include <algorithm>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/observer.h"
#include "fp8kv/progress.h"
#include "fp8kv/workflows.h"

namespace fp8kv {

CalibrateResult calibrate(const Model& model, Backend& backend, ModelOps& ops,
                          const TokenData& data, const CalibrateOptions& options) {
  const ModelConfig& c = model.config();
  if (options.batch_size < 1) {
    throw Error("calibrate: batch size must be >= 1, got " + std::to_string(options.batch_size));
  }
  if (data.empty()) throw Error("calibrate: no token data");
  const int batch = options.batch_size;
  const int passes_available = static_cast<int>((data.size() + batch - 1) / batch);

  ObserverConfig base;
  base.num_layers = c.num_layers;
  base.num_kv_heads = model.shard().kv_heads;  // this rank's
  base.total_kv_heads = c.num_kv_heads;
  base.quant_type = options.quant_type;
  base.warmup = 0;
  base.count = passes_available;
  ObserverConfig oc = observer_config_from_env(base);
  if (options.warmup) oc.warmup = *options.warmup;
  if (options.count) oc.count = *options.count;
  if (oc.warmup < 0 || oc.count < 1) {
    throw Error("calibrate: warmup must be >= 0 and count >= 1, got warmup " +
                std::to_string(oc.warmup) + ", count " + std::to_string(oc.count));
  }
  if (oc.warmup + oc.count > passes_available) {
    throw Error("calibrate: the data gives " + std::to_string(passes_available) +
                " forward passes (" + std::to_string(data.size()) + " sequences in batches of " +
                std::to_string(batch) + "), fewer than warmup " + std::to_string(oc.warmup) +
                " + count " + std::to_string(oc.count) +
                "; give more data, or a smaller --count / --warmup");
  }
  Observer observer(oc);

  int64_t max_batch_tokens = 0;
  int max_len = 0;
  for (size_t i = 0; i < data.size(); i += static_cast<size_t>(batch)) {
    int64_t t = 0;
    for (size_t j = i; j < std::min(data.size(), i + static_cast<size_t>(batch)); ++j) {
      t += static_cast<int64_t>(data[j].size());
      max_len = std::max(max_len, static_cast<int>(data[j].size()));
    }
    max_batch_tokens = std::max(max_batch_tokens, t);
  }
  RunnerOptions ro;
  ro.scheme = KvScheme::kBf16;
  ro.observer = &observer;
  ro.num_slots = max_batch_tokens;
  ro.max_requests = batch;
  ro.max_len = max_len;
  ro.comm = options.comm;
  ro.exact_tp = options.exact_tp;
  ModelRunner runner(model, backend, ops, std::move(ro));

  CalibrateResult result;
  result.warmup = oc.warmup;
  result.count = oc.count;
  const int passes_needed = oc.warmup + oc.count;
  Progress progress(std::string("calibrating (") + quant_type_name(options.quant_type) + ")",
                    passes_needed, options.show_progress);
  for (size_t i = 0; i < data.size() && !observer.done(); i += static_cast<size_t>(batch)) {
    std::vector<int> reqs;
    std::vector<std::vector<int32_t>> tokens;
    for (size_t j = i; j < std::min(data.size(), i + static_cast<size_t>(batch)); ++j) {
      reqs.push_back(runner.add_request());
      tokens.push_back(data[j]);
      result.tokens += static_cast<int64_t>(data[j].size());
    }
    runner.forward(reqs, tokens, LogitRows::kNone);
    for (int r : reqs) runner.release(r);
    ++result.passes_run;
    progress.update(result.passes_run, result.tokens);
  }
  progress.finish();
  auto single = make_single_communicator();
  result.data = observer.finalize(options.comm ? *options.comm : *single, c.architecture);
  return result;
}

}  // namespace fp8kv
