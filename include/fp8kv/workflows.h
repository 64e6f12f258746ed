// The user's workflows over a model and token data (docs/DESIGN.md, "The workflow the user
// runs"): calibrate, and evaluate bf16 against both FP8 schemes. The CLI commands are thin
// layers over these.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/export.h"
#include "fp8kv/model.h"
#include "fp8kv/token_data.h"

namespace fp8kv {

struct CalibrateOptions {
  QuantType quant_type = QuantType::kPerHead;
  // Forward passes each layer skips, then observes. Unset: warmup 0 and count = every pass the
  // data gives after the warmup; FP8KV_CALIB_WARMUP / FP8KV_CALIB_COUNT (or LightLLM's names for
  // them: calib_warmup_from_env) override those defaults, and values set here override the
  // environment.
  std::optional<int> warmup;
  std::optional<int> count;
  int batch_size = 4;  // sequences per prefill pass
  // Greedy decode steps after each prefill batch, each one more forward pass whose K/V writes
  // are observed (as LightLLM's live calibration sees decode): a batch gives 1 + generate
  // passes, and warmup / count count them all.
  int generate = 0;
  bool show_progress = false;
  // Tensor parallelism: the model's shard group (RunnerOptions::comm). Each rank observes its
  // own KV heads; the result, gathered into global head order, is the same on every rank.
  Communicator* comm = nullptr;
  // RunnerOptions::exact_tp: the file at tp = 2, 4, 8 equals the tp = 1 file value for value,
  // at the cost of fixed-order GEMMs (0.11-0.16x cuBLAS). false (the default): the fast GEMMs,
  // whose summation order depends on the shard's shape, so scales after layer 0 may differ from
  // tp = 1's in their last bits (measured: 1 of 64, by about one bf16 rounding step).
  bool exact_tp = false;
  // Also record Q's abs-max per (layer, KV head) over the same passes and write static Q scales
  // (q_calibration) for fp8-per-head. per_head only (Error otherwise).
  bool q_scales = false;
};

struct CalibrateResult {
  CalibData data;
  int warmup = 0;
  int count = 0;
  // Where warmup and count came from: "--warmup", "FP8KV_CALIB_WARMUP=3",
  // "KV_QUANT_CALIBRATION_WARMUP_COUNT=3 (LightLLM's name)", "default", ...
  std::string warmup_source;
  std::string count_source;
  int passes_run = 0;     // forward passes run, prefill and decode (the data may hold more)
  int decode_passes = 0;  // of which decode steps (CalibrateOptions::generate)
  int64_t tokens = 0;     // tokens run through the model, prompts and generated ones
};

// Runs the model with a bf16 cache over `data` with an observer and finalizes it (over
// options.comm with tp > 1: every rank runs this call). Throws Error
// when the data gives fewer passes than warmup + count.
FP8KV_API CalibrateResult calibrate(const Model& model, Backend& backend, ModelOps& ops,
                                    const TokenData& data, const CalibrateOptions& options);

struct EvalOptions {
  int batch_size = 4;
  bool show_progress = false;
  Communicator* comm = nullptr;  // tensor parallelism (RunnerOptions::comm)
  std::vector<int> bf16_layers;  // kept in bf16 in every FP8 cache (RunnerOptions::bf16_layers)
  // The FP8 caches compared with bf16, in this order (each costs one more full run and one more
  // shadow pool): fp8-per-tensor takes the per-tensor scales, fp8-per-head and
  // fp8-per-head-bf16q the per-head ones, fp8-e5m2 none. `fp8kv eval --kv-schemes`.
  std::vector<KvScheme> schemes = {KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead};
};

// One scheme's numbers against the bf16 run, over every position that has a next token.
struct SchemeEval {
  KvScheme scheme = KvScheme::kBf16;
  // The column's name: scheme_name(scheme), or "per-head static-Q" for fp8-per-head with
  // q_calibration's static Q scales.
  std::string label;
  double perplexity = 0.0;  // exp(mean NLL of the next token)
  double kl_mean = 0.0;     // mean KL(p_bf16 || p_scheme), nats
  double kl_max = 0.0;
  double top1_agreement = 1.0;         // fraction of positions whose argmax equals bf16's
  std::vector<double> attn_rel_error;  // [layers] ||o_scheme - o_bf16|| / ||o_bf16||, same inputs
  // [layers, num_kv_heads] the same over the query heads of each KV head's group
  std::vector<double> head_attn_rel_error;
  int num_kv_heads = 0;
  // Static Q scales only: [layers, num_kv_heads] the abs-max of the Q this run saw over the
  // range of its static scale, amax / (448 * s). Above 1, Q values of that (layer, KV head)
  // saturated to +-448. Empty for the other columns.
  std::vector<double> q_range_use;
};

struct EvalResult {
  // bf16, then one column per EvalOptions::schemes in order (fp8-per-head with dynamic Q
  // scales), with "per-head static-Q" right after fp8-per-head when the per-head scales have
  // static Q scales.
  std::vector<SchemeEval> schemes;
  int64_t positions = 0;
  int64_t tokens = 0;
  double seconds = 0.0;
  std::vector<int> bf16_layers;  // as given in EvalOptions
};

// The layers worth keeping in bf16 for one FP8 scheme, from its per-layer attention error
// (SchemeEval::attn_rel_error): those whose error exceeds `factor` x the median over the layers
// that are in FP8 (error > 0; a bf16 layer has none), largest first, at most max(1, layers / 8)
// of them. Empty when no layer stands out.
FP8KV_API std::vector<int> suggest_bf16_layers(const std::vector<double>& attn_rel_error,
                                               double factor = 2.0);

// bf16 vs the FP8 caches of options.schemes (default fp8-per-tensor and fp8-per-head) on the same
// data. The per-layer attention error runs every FP8 cache beside the bf16 run on its very inputs
// (ShadowScheme); the logit metrics come from full runs with each cache. `per_tensor` and
// `per_head` are read only by the schemes that take them (an unused one may be empty). When
// fp8-per-head is chosen and per_head has static Q scales (RankScales::q), its column runs with
// dynamic Q scales and a "per-head static-Q" column with the static ones. With tp > 1 every rank
// runs this call (scales: the rank's slice) and gets the same result; the attention errors are
// summed over ranks' heads.
FP8KV_API EvalResult evaluate(const Model& model, Backend& backend, ModelOps& ops,
                              const TokenData& data, const RankScales& per_tensor,
                              const RankScales& per_head, const EvalOptions& options);

// The result as one table (schemes as columns, metrics and per-layer errors as rows; under
// each layer its worst KV head and that head's error).
FP8KV_API std::string format_eval_table(const EvalResult& result);
// The per-head attention error of every FP8 scheme: one [layers x KV heads] grid each.
FP8KV_API std::string format_eval_heads(const EvalResult& result);

}  // namespace fp8kv
