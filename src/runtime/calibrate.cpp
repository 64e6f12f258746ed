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
  if (options.generate < 0) {
    throw Error("calibrate: --generate must be >= 0, got " + std::to_string(options.generate));
  }
  if (data.empty()) throw Error("calibrate: no token data");
  const int batch = options.batch_size;
  const int batches = static_cast<int>((data.size() + batch - 1) / batch);
  const int passes_per_batch = 1 + options.generate;  // the prefill, then the decode steps
  const int passes_available = batches * passes_per_batch;

  ObserverConfig oc;
  oc.num_layers = c.num_layers;
  oc.num_kv_heads = model.shard().kv_heads;  // this rank's
  oc.total_kv_heads = c.num_kv_heads;
  oc.quant_type = options.quant_type;
  if (options.q_scales && options.quant_type != QuantType::kPerHead) {
    throw Error("calibrate: --q-scales records static Q scales for fp8-per-head; the scheme is " +
                std::string(quant_type_name(options.quant_type)) + " (use --scheme per-head)");
  }
  oc.q_scales = options.q_scales;
  oc.warmup = 0;
  CalibrateResult result;
  result.warmup_source = "default";
  // Which variable gave a setting, for the report: LightLLM's names say so, and a LightLLM
  // variable that lost to ours is named too.
  auto describe = [](const CalibEnvSetting& e) {
    std::string out = e.variable + "=" + std::to_string(e.value);
    if (e.variable.rfind("FP8KV_", 0) != 0) out += " (LightLLM's name)";
    if (!e.ignored.empty()) out += ", over " + e.ignored;
    return out;
  };
  if (const auto w = calib_warmup_from_env()) {
    oc.warmup = w->value;
    result.warmup_source = describe(*w);
  }
  if (options.warmup) {
    oc.warmup = *options.warmup;
    result.warmup_source = "--warmup";
  }
  // Unset, the count is every pass the data gives after the warmup.
  oc.count = passes_available - oc.warmup;
  result.count_source = "default: every pass the data gives after the warmup";
  if (const auto n = calib_count_from_env()) {
    oc.count = n->value;
    result.count_source = describe(*n);
  }
  if (options.count) {
    oc.count = *options.count;
    result.count_source = "--count";
  }
  if (oc.warmup < 0 || oc.count < 1) {
    throw Error("calibrate: warmup must be >= 0 and count >= 1, got warmup " +
                std::to_string(oc.warmup) + " (" + result.warmup_source + "), count " +
                std::to_string(oc.count) + " (" + result.count_source + ")");
  }
  if (oc.warmup + oc.count > passes_available) {
    const std::string decode =
        options.generate > 0
            ? " x (1 prefill + " + std::to_string(options.generate) + " decode steps)"
            : "";
    throw Error("calibrate: the data gives " + std::to_string(passes_available) +
                " forward passes (" + std::to_string(data.size()) + " sequences in batches of " +
                std::to_string(batch) + decode + "), fewer than warmup " +
                std::to_string(oc.warmup) + " (" + result.warmup_source + ") + count " +
                std::to_string(oc.count) + " (" + result.count_source +
                "); give more data, or a smaller --count / --warmup");
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
  ro.num_slots = max_batch_tokens + static_cast<int64_t>(batch) * options.generate;
  ro.max_requests = batch;
  ro.max_len = max_len + options.generate;
  ro.comm = options.comm;
  ro.exact_tp = options.exact_tp;
  ModelRunner runner(model, backend, ops, std::move(ro));

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
    auto pass_done = [&](bool decode) {
      ++result.passes_run;
      if (decode) ++result.decode_passes;
      progress.update(result.passes_run, result.tokens);
    };
    if (options.generate == 0) {
      runner.forward(reqs, tokens, LogitRows::kNone);
      pass_done(false);
    } else {
      // Prefill, then greedy decode steps: every step writes one K/V row per request into
      // every layer, and the observer counts it as one pass (LightLLM counts each decode
      // step's cache write the same way). Every rank stops at the same step: their observers
      // see the same passes.
      std::vector<int32_t> next = runner.forward_greedy(reqs, tokens);
      pass_done(false);
      for (int step = 0; step < options.generate && !observer.done(); ++step) {
        for (size_t b = 0; b < reqs.size(); ++b) tokens[b] = {next[b]};
        result.tokens += static_cast<int64_t>(reqs.size());
        next = runner.forward_greedy(reqs, tokens);
        pass_done(true);
      }
    }
    for (int r : reqs) runner.release(r);
  }
  progress.finish();
  auto single = make_single_communicator();
  result.data = observer.finalize(options.comm ? *options.comm : *single, c.architecture);
  return result;
}

}  // namespace fp8kv
