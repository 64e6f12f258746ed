// evaluate(): bf16 vs the FP8 caches (fp8-per-tensor, fp8-per-head, ...) on the same token data.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/model.h"
#include "fp8kv/progress.h"
#include "fp8kv/workflows.h"

namespace fp8kv {

// ---- the shadow schemes' accounting (ModelRunner::run_shadows calls add) ----------------

AttentionErrorStats::AttentionErrorStats(KvScheme scheme_, int num_layers, int num_kv_heads_)
    : scheme(scheme_), num_kv_heads(num_kv_heads_) {
  if (num_layers < 1 || num_kv_heads_ < 1) {
    throw Error("attention error stats: need >= 1 layer and KV head, got " +
                std::to_string(num_layers) + " layers, " + std::to_string(num_kv_heads_) +
                " KV heads");
  }
  const size_t L = static_cast<size_t>(num_layers);
  diff_sq.assign(L, 0.0);
  ref_sq.assign(L, 0.0);
  head_diff_sq.assign(L * static_cast<size_t>(num_kv_heads_), 0.0);
  head_ref_sq.assign(L * static_cast<size_t>(num_kv_heads_), 0.0);
}

namespace {

double normalized(double diff, double ref) {
  return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

}  // namespace

double AttentionErrorStats::rel_error(int layer) const {
  const size_t l = static_cast<size_t>(layer);
  return normalized(diff_sq[l], ref_sq[l]);
}

double AttentionErrorStats::head_rel_error(int layer, int kv_head) const {
  const size_t i =
      static_cast<size_t>(layer) * static_cast<size_t>(num_kv_heads) + static_cast<size_t>(kv_head);
  return normalized(head_diff_sq[i], head_ref_sq[i]);
}

void AttentionErrorStats::add(int layer, const uint16_t* main, const uint16_t* shadow, int64_t rows,
                              int q_heads, int kv_heads, int kv_head_begin, int head_dim) {
  if (layer < 0 || static_cast<size_t>(layer) >= diff_sq.size()) {
    throw Error("attention error stats: layer " + std::to_string(layer) + " out of range [0, " +
                std::to_string(diff_sq.size()) + ")");
  }
  if (kv_heads < 1 || q_heads % kv_heads != 0 || kv_head_begin < 0 ||
      kv_head_begin + kv_heads > num_kv_heads || head_dim < 1 || rows < 0) {
    throw Error("attention error stats: " + std::to_string(q_heads) + " Q heads over KV heads [" +
                std::to_string(kv_head_begin) + ", " + std::to_string(kv_head_begin + kv_heads) +
                ") do not fit " + std::to_string(num_kv_heads) + " KV heads (head_dim " +
                std::to_string(head_dim) + ", rows " + std::to_string(rows) + ")");
  }
  const int64_t group_width = static_cast<int64_t>(q_heads / kv_heads) * head_dim;
  const int64_t row_width = static_cast<int64_t>(q_heads) * head_dim;
  double* hd = head_diff_sq.data() + static_cast<size_t>(layer) * num_kv_heads + kv_head_begin;
  double* hr = head_ref_sq.data() + static_cast<size_t>(layer) * num_kv_heads + kv_head_begin;
  for (int j = 0; j < kv_heads; ++j) {
    double diff = 0.0, ref = 0.0;
    for (int64_t t = 0; t < rows; ++t) {
      const size_t off = static_cast<size_t>(t * row_width + j * group_width);
      for (int64_t e = 0; e < group_width; ++e) {
        const double r = bf16_to_float(main[off + static_cast<size_t>(e)]);
        const double d = bf16_to_float(shadow[off + static_cast<size_t>(e)]) - r;
        diff += d * d;
        ref += r * r;
      }
    }
    hd[j] += diff;
    hr[j] += ref;
    diff_sq[static_cast<size_t>(layer)] += diff;
    ref_sq[static_cast<size_t>(layer)] += ref;
  }
}

namespace {

// {0, 31} -> "0,31" (what --kv-bf16-layers takes).
std::string layer_list_text(const std::vector<int>& layers) {
  std::string out;
  for (size_t i = 0; i < layers.size(); ++i) out += (i ? "," : "") + std::to_string(layers[i]);
  return out;
}

// log_softmax of one row of logits, in double.
void log_softmax(const float* logits, int64_t n, std::vector<double>& out) {
  out.resize(static_cast<size_t>(n));
  double mx = logits[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(logits[i] - mx);
  const double lse = mx + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = logits[i] - lse;
}

int64_t argmax_of(const std::vector<double>& v) {
  return std::max_element(v.begin(), v.end()) - v.begin();
}

// Each rank's attention error covers its own heads: sum the squares over ranks (as float, the
// Communicator's type: ample for an error metric). A KV head held by several ranks (tp > Hkv)
// gets each one's share of its query heads.
AttentionErrorStats summed_over_ranks(AttentionErrorStats st, Communicator* comm) {
  if (comm == nullptr || comm->world_size() == 1) return st;
  std::vector<std::vector<double>*> parts = {&st.diff_sq, &st.ref_sq, &st.head_diff_sq,
                                             &st.head_ref_sq};
  std::vector<float> all;  // every part, one after another
  for (const auto* p : parts) all.insert(all.end(), p->begin(), p->end());
  comm->all_reduce_sum(all.data(), all.size());
  size_t i = 0;
  for (auto* p : parts) {
    for (double& x : *p) x = all[i++];
  }
  return st;
}

// A column's name: its label, or the scheme's name for a result made without one.
std::string column_label(const SchemeEval& s) {
  return s.label.empty() ? std::string(scheme_name(s.scheme)) : s.label;
}

struct Accum {
  double nll = 0.0, kl = 0.0, kl_max = 0.0;
  int64_t agree = 0;
};

}  // namespace

EvalResult evaluate(const Model& model, Backend& backend, ModelOps& ops, const TokenData& data,
                    const RankScales& per_tensor, const RankScales& per_head,
                    const EvalOptions& options) {
  const ModelConfig& c = model.config();
  if (options.batch_size < 1) {
    throw Error("eval: batch size must be >= 1, got " + std::to_string(options.batch_size));
  }
  if (data.empty()) throw Error("eval: no token data");
  const size_t batch = static_cast<size_t>(options.batch_size);
  int64_t max_batch_tokens = 0;
  int max_len = 0;
  for (size_t i = 0; i < data.size(); i += batch) {
    int64_t t = 0;
    for (size_t j = i; j < std::min(data.size(), i + batch); ++j) {
      t += static_cast<int64_t>(data[j].size());
      max_len = std::max(max_len, static_cast<int>(data[j].size()));
    }
    max_batch_tokens = std::max(max_batch_tokens, t);
  }
  // The FP8 caches asked for (bf16 is the reference, always run).
  std::vector<KvScheme> schemes;
  for (KvScheme s : options.schemes) {
    if (!is_fp8(s)) {
      throw Error(std::string("eval: scheme ") + scheme_name(s) +
                  " is not an FP8 cache (bf16 is always the reference)");
    }
    if (std::find(schemes.begin(), schemes.end(), s) != schemes.end()) {
      throw Error(std::string("eval: scheme ") + scheme_name(s) + " is given twice");
    }
    schemes.push_back(s);
  }
  // The columns after bf16: each a full run with its cache (logit metrics) and a shadow of the
  // bf16 run (attention error on the same inputs). A scheme's scales: the per-tensor or per-head
  // ones, none for fp8-e5m2; static Q scales only where asked for (the "per-head static-Q"
  // column right after fp8-per-head, when per_head has them): fp8-per-head runs dynamic Q and
  // fp8-per-head-bf16q has no FP8 Q.
  struct Column {
    std::string label;
    KvScheme scheme;
    std::optional<RankScales> scales;
  };
  auto scales_of = [&](KvScheme scheme) -> std::optional<RankScales> {
    const std::optional<QuantType> q = calib_quant_type(scheme);
    if (!q) return std::nullopt;
    RankScales sc = *q == QuantType::kPerHead ? per_head : per_tensor;
    sc.q.reset();
    return sc;
  };
  std::vector<Column> columns;
  for (KvScheme s : schemes) {
    columns.push_back({scheme_name(s), s, scales_of(s)});
    if (s == KvScheme::kFp8PerHead && per_head.q) {
      columns.push_back({"per-head static-Q", s, per_head});
    }
  }
  auto options_for = [&](KvScheme scheme) {
    RunnerOptions ro;
    ro.scheme = scheme;
    ro.num_slots = max_batch_tokens;
    ro.max_requests = options.batch_size;
    ro.max_len = max_len;
    ro.comm = options.comm;
    ro.bf16_layers = options.bf16_layers;
    return ro;
  };
  RunnerOptions ref_opts = options_for(KvScheme::kBf16);
  for (const Column& col : columns) {
    ref_opts.shadows.push_back({col.scheme, col.scales.value_or(RankScales{})});
  }
  std::vector<std::unique_ptr<ModelRunner>> runners;
  runners.push_back(std::make_unique<ModelRunner>(model, backend, ops, std::move(ref_opts)));
  for (const Column& col : columns) {
    RunnerOptions ro = options_for(col.scheme);
    ro.scales = col.scales;
    ro.record_q_amax = col.scales && col.scales->q.has_value();
    runners.push_back(std::make_unique<ModelRunner>(model, backend, ops, std::move(ro)));
  }
  ModelRunner& ref = *runners[0];
  const size_t num_runs = runners.size();

  EvalResult result;
  result.bf16_layers = options.bf16_layers;
  std::vector<Accum> acc(num_runs);
  const int64_t V = c.vocab_size;
  const auto start = std::chrono::steady_clock::now();
  std::string what = "evaluating bf16";
  for (const Column& col : columns) what += " / " + col.label;
  Progress progress(what, static_cast<int64_t>(data.size()), options.show_progress);
  std::vector<double> ref_lp, lp;
  for (size_t i = 0; i < data.size(); i += batch) {
    std::vector<std::vector<int32_t>> tokens(
        data.begin() + static_cast<std::ptrdiff_t>(i),
        data.begin() + static_cast<std::ptrdiff_t>(std::min(data.size(), i + batch)));
    std::vector<std::vector<float>> logits(num_runs);
    for (size_t s = 0; s < num_runs; ++s) {
      std::vector<int> reqs;
      for (size_t b = 0; b < tokens.size(); ++b) reqs.push_back(runners[s]->add_request());
      logits[s] = runners[s]->forward(reqs, tokens, LogitRows::kAll);
      for (int r : reqs) runners[s]->release(r);
    }
    int64_t row = 0;
    for (const auto& seq : tokens) {
      for (size_t t = 0; t < seq.size(); ++t, ++row) {
        result.tokens += 1;
        if (t + 1 == seq.size()) continue;  // no next token to score
        const int32_t next = seq[t + 1];
        log_softmax(logits[0].data() + row * V, V, ref_lp);
        const int64_t ref_top = argmax_of(ref_lp);
        for (size_t s = 0; s < num_runs; ++s) {
          const std::vector<double>* cur = &ref_lp;
          if (s > 0) {
            log_softmax(logits[s].data() + row * V, V, lp);
            cur = &lp;
            double kl = 0.0;
            for (int64_t v = 0; v < V; ++v) {
              const double p = std::exp(ref_lp[static_cast<size_t>(v)]);
              kl += p * (ref_lp[static_cast<size_t>(v)] - lp[static_cast<size_t>(v)]);
            }
            kl = std::max(kl, 0.0);  // rounding can make a tiny KL negative
            acc[s].kl += kl;
            acc[s].kl_max = std::max(acc[s].kl_max, kl);
          }
          acc[s].nll -= (*cur)[static_cast<size_t>(next)];
          if (argmax_of(*cur) == ref_top) acc[s].agree += 1;
        }
        result.positions += 1;
      }
    }
    progress.update(static_cast<int64_t>(std::min(data.size(), i + batch)),
                    result.tokens * static_cast<int64_t>(num_runs));
  }
  progress.finish();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (result.positions == 0) {
    throw Error("eval: no position has a next token (every sequence has one token)");
  }
  const double n = static_cast<double>(result.positions);
  const TpShard& shard = model.shard();
  for (size_t s = 0; s < num_runs; ++s) {
    SchemeEval e;
    e.scheme = s == 0 ? KvScheme::kBf16 : columns[s - 1].scheme;
    e.label = s == 0 ? scheme_name(KvScheme::kBf16) : columns[s - 1].label;
    e.perplexity = std::exp(acc[s].nll / n);
    e.kl_mean = acc[s].kl / n;
    e.kl_max = acc[s].kl_max;
    e.top1_agreement = static_cast<double>(acc[s].agree) / n;
    e.num_kv_heads = c.num_kv_heads;
    e.attn_rel_error.assign(static_cast<size_t>(c.num_layers), 0.0);
    e.head_attn_rel_error.assign(static_cast<size_t>(c.num_layers * c.num_kv_heads), 0.0);
    if (s > 0) {
      const AttentionErrorStats st = summed_over_ranks(ref.shadow_stats()[s - 1], options.comm);
      for (int l = 0; l < c.num_layers; ++l) {
        e.attn_rel_error[static_cast<size_t>(l)] = st.rel_error(l);
        for (int h = 0; h < c.num_kv_heads; ++h) {
          e.head_attn_rel_error[static_cast<size_t>(l * c.num_kv_heads + h)] =
              st.head_rel_error(l, h);
        }
      }
      const std::optional<RankScales>& sc = columns[s - 1].scales;
      const std::vector<float>& q_amax = runners[s]->q_amax();
      if (sc && sc->q && !q_amax.empty()) {
        // This rank's KV heads into the model's [layers, Hkv] table, max over ranks (a head
        // held by several ranks: each saw its part of the group).
        std::vector<float> use(static_cast<size_t>(c.num_layers * c.num_kv_heads), 0.0f);
        const int h = shard.kv_heads;
        for (int l = 0; l < c.num_layers; ++l) {
          for (int j = 0; j < h; ++j) {
            const size_t i = static_cast<size_t>(l) * h + static_cast<size_t>(j);
            use[static_cast<size_t>(l * c.num_kv_heads + shard.kv_head_begin + j)] =
                q_amax[i] / (kE4m3Max * (*sc->q)[i]);
          }
        }
        if (options.comm != nullptr && options.comm->world_size() > 1) {
          options.comm->all_reduce_max(use.data(), use.size());
        }
        e.q_range_use.assign(use.begin(), use.end());
      }
    }
    result.schemes.push_back(std::move(e));
  }
  return result;
}

std::string format_eval_table(const EvalResult& r) {
  std::string out;
  char buf[512];
  const char* kRow = "%-30s";
  // Columns 16 wide, wider when a label needs it (fp8-per-head-bf16q, per-head static-Q).
  int w = 16;
  for (const auto& s : r.schemes) {
    w = std::max(w, static_cast<int>(column_label(s).size()) + 2);
  }
  auto cell = [&](const char* fmt, double v) {
    char c[64];
    std::snprintf(c, sizeof c, fmt, v);
    std::snprintf(buf, sizeof buf, "%*s", w, c);
    out += buf;
  };
  std::snprintf(buf, sizeof buf, kRow, "");
  out += buf;
  for (const auto& s : r.schemes) {
    std::snprintf(buf, sizeof buf, "%*s", w, column_label(s).c_str());
    out += buf;
  }
  out += "\n";
  auto row = [&](const char* label, auto value, const char* fmt, bool ref_dash) {
    std::snprintf(buf, sizeof buf, kRow, label);
    out += buf;
    for (size_t i = 0; i < r.schemes.size(); ++i) {
      if (ref_dash && r.schemes[i].scheme == KvScheme::kBf16) {
        std::snprintf(buf, sizeof buf, "%*s", w, "-");
        out += buf;
      } else {
        cell(fmt, value(r.schemes[i]));
      }
    }
    out += "\n";
  };
  row(
      "perplexity", [](const SchemeEval& s) { return s.perplexity; }, "%.4f", false);
  row(
      "KL vs bf16, mean (nats)", [](const SchemeEval& s) { return s.kl_mean; }, "%.3e", true);
  row(
      "KL vs bf16, max (nats)", [](const SchemeEval& s) { return s.kl_max; }, "%.3e", true);
  row(
      "top-1 agreement with bf16", [](const SchemeEval& s) { return 100.0 * s.top1_agreement; },
      "%.2f%%", true);
  const size_t layers = r.schemes.empty() ? 0 : r.schemes[0].attn_rel_error.size();
  for (size_t l = 0; l < layers; ++l) {
    char label[64];
    std::snprintf(label, sizeof label, "attn-out rel. error, layer %zu", l);
    row(
        label, [l](const SchemeEval& s) { return s.attn_rel_error[l]; }, "%.3e", true);
    // The layer's worst KV head: "h<index> <its error>".
    std::snprintf(buf, sizeof buf, kRow, "  worst KV head");
    out += buf;
    for (const SchemeEval& s : r.schemes) {
      char c[64] = "-";
      if (s.scheme != KvScheme::kBf16 && s.num_kv_heads > 0) {
        const double* h = s.head_attn_rel_error.data() + l * static_cast<size_t>(s.num_kv_heads);
        const int worst = static_cast<int>(std::max_element(h, h + s.num_kv_heads) - h);
        std::snprintf(c, sizeof c, "h%d %.3e", worst, h[worst]);
      }
      std::snprintf(buf, sizeof buf, "%*s", w, c);
      out += buf;
    }
    out += "\n";
  }
  std::snprintf(buf, sizeof buf,
                "(%lld positions scored, %lld tokens per scheme; attention error: each FP8 cache "
                "run beside bf16 on the same layer inputs)\n",
                static_cast<long long>(r.positions), static_cast<long long>(r.tokens));
  out += buf;
  if (!r.bf16_layers.empty()) {
    out += "(--kv-bf16-layers " + layer_list_text(r.bf16_layers) +
           ": kept in bf16 in every FP8 cache, attention error 0 there)\n";
  }
  // Static Q scales: how much of their range the evaluated Q used, and where it saturated.
  for (const SchemeEval& s : r.schemes) {
    if (s.q_range_use.empty() || s.num_kv_heads < 1) continue;
    const auto worst = std::max_element(s.q_range_use.begin(), s.q_range_use.end());
    const size_t at = static_cast<size_t>(worst - s.q_range_use.begin());
    const long long over =
        std::count_if(s.q_range_use.begin(), s.q_range_use.end(), [](double u) { return u > 1.0; });
    std::snprintf(buf, sizeof buf,
                  "%s: Q's abs-max over its static range 448 * s: at most %.3f (layer %zu, KV "
                  "head %zu); %lld of %zu (layer, KV head) pairs above 1, their larger Q values "
                  "saturated to +-448\n",
                  column_label(s).c_str(), *worst, at / static_cast<size_t>(s.num_kv_heads),
                  at % static_cast<size_t>(s.num_kv_heads), over, s.q_range_use.size());
    out += buf;
  }
  // Which layers lose most, and the set --kv-bf16-layers could keep in bf16.
  for (const SchemeEval& s : r.schemes) {
    if (!is_fp8(s.scheme)) continue;
    std::vector<int> order;
    for (size_t l = 0; l < s.attn_rel_error.size(); ++l) {
      if (s.attn_rel_error[l] > 0.0) order.push_back(static_cast<int>(l));
    }
    if (order.empty()) continue;
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return s.attn_rel_error[a] > s.attn_rel_error[b]; });
    std::string worst;
    for (size_t i = 0; i < std::min<size_t>(3, order.size()); ++i) {
      std::snprintf(buf, sizeof buf, "%s%d (%.2e)", i ? ", " : "", order[i],
                    s.attn_rel_error[static_cast<size_t>(order[i])]);
      worst += buf;
    }
    const std::vector<int> suggested = suggest_bf16_layers(s.attn_rel_error);
    out += column_label(s) + ": layers losing most " + worst + "; " +
           (suggested.empty() ? std::string("none above 2x the median: no --kv-bf16-layers "
                                            "suggested")
                              : "suggested --kv-bf16-layers " + layer_list_text(suggested) +
                                    " (above 2x the median layer's error)") +
           "\n";
  }
  return out;
}

std::vector<int> suggest_bf16_layers(const std::vector<double>& attn_rel_error, double factor) {
  std::vector<int> fp8_layers;
  std::vector<double> errors;
  for (size_t l = 0; l < attn_rel_error.size(); ++l) {
    if (attn_rel_error[l] > 0.0) {
      fp8_layers.push_back(static_cast<int>(l));
      errors.push_back(attn_rel_error[l]);
    }
  }
  if (errors.empty()) return {};
  std::sort(errors.begin(), errors.end());
  const size_t n = errors.size();
  const double median = n % 2 ? errors[n / 2] : 0.5 * (errors[n / 2 - 1] + errors[n / 2]);
  std::vector<int> out;
  for (int l : fp8_layers) {
    if (attn_rel_error[static_cast<size_t>(l)] > factor * median) out.push_back(l);
  }
  std::sort(out.begin(), out.end(), [&](int a, int b) {
    return attn_rel_error[static_cast<size_t>(a)] > attn_rel_error[static_cast<size_t>(b)];
  });
  const size_t cap = std::max<size_t>(1, attn_rel_error.size() / 8);
  if (out.size() > cap) out.resize(cap);
  return out;
}

std::string format_eval_heads(const EvalResult& r) {
  std::string out;
  char buf[64];
  for (const SchemeEval& s : r.schemes) {
    if (s.scheme == KvScheme::kBf16 || s.num_kv_heads < 1) continue;
    const size_t H = static_cast<size_t>(s.num_kv_heads);
    out += "attn-out rel. error per KV head, " + column_label(s) + "\n";
    out += "layer";
    for (size_t h = 0; h < H; ++h) {
      std::snprintf(buf, sizeof buf, "%11s%zu", "h", h);
      out += buf;
    }
    out += "\n";
    for (size_t l = 0; l < s.attn_rel_error.size(); ++l) {
      std::snprintf(buf, sizeof buf, "%5zu", l);
      out += buf;
      for (size_t h = 0; h < H; ++h) {
        std::snprintf(buf, sizeof buf, "%12.3e", s.head_attn_rel_error[l * H + h]);
        out += buf;
      }
      out += "\n";
    }
  }
  return out;
}

}  // namespace fp8kv
