// fp8kv generate: greedy generation from a text prompt (or token ids) with a chosen KV cache.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/parallel.h"
#include "cli/text_input.h"
#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/scheme.h"

namespace fp8kv::cli {

namespace {

// "1,2,3" -> {1, 2, 3}.
std::vector<int32_t> parse_ids(const std::string& text) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i <= text.size()) {
    const size_t j = std::min(text.find(',', i), text.size());
    const std::string item = text.substr(i, j - i);
    size_t used = 0;
    long v = -1;
    try {
      v = std::stol(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < 0 || v > 2147483647L) {
      throw fp8kv::Error("--input-ids '" + text + "': '" + item + "' is not a token id");
    }
    ids.push_back(static_cast<int32_t>(v));
    i = j + 1;
  }
  return ids;
}

// Greedy generation of one prompt that also writes every row of logits it computed: the prompt
// positions (prefill) and each decode step, as raw float32 [prompt + max_new - 1, vocab]. The
// file is written to a temporary name and renamed, so a failed run leaves no partial file.
std::vector<std::vector<int32_t>> generate_dumping_logits(
    ModelRunner& runner, const std::vector<std::vector<int32_t>>& prompts, int max_new, int vocab,
    const std::string& path, bool write_file) {
  if (prompts.size() != 1) {
    throw fp8kv::Error("--dump-logits takes exactly one --input-ids prompt, got " +
                       std::to_string(prompts.size()));
  }
  auto argmax = [vocab](const float* row) {
    return static_cast<int32_t>(std::max_element(row, row + vocab) - row);
  };
  const int req = runner.add_request();
  std::vector<float> all = runner.forward({req}, prompts, LogitRows::kAll);
  std::vector<int32_t> generated = {argmax(all.data() + all.size() - vocab)};
  while (static_cast<int>(generated.size()) < max_new) {
    const std::vector<float> step = runner.forward({req}, {{generated.back()}}, LogitRows::kLast);
    all.insert(all.end(), step.begin(), step.end());
    generated.push_back(argmax(step.data()));
  }
  runner.release(req);
  if (!write_file) return {generated};  // another tensor-parallel rank writes it
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw fp8kv::Error("--dump-logits: cannot write " + tmp);
  const bool ok = std::fwrite(all.data(), sizeof(float), all.size(), f) == all.size();
  if (std::fclose(f) != 0 || !ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw fp8kv::Error("--dump-logits: writing " + path + " failed");
  }
  return {generated};
}

}  // namespace

void add_generate(CLI::App& app) {
  struct Opts {
    std::string model, kv = "bf16", device = "auto";
    std::optional<std::string> calib;
    std::vector<std::string> inputs, prompts;
    std::optional<std::string> tokenizer;
    int max_new = 16;
    std::optional<std::string> dump_logits;
    int tp = 1;
    bool exact_tp = false;
    CudaGraphChoice cuda_graph;
    std::optional<std::string> bf16_layers;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("generate", "Greedy generation from a prompt or token ids");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  cmd->add_option("--kv", opt->kv,
                  "KV cache: bf16, fp8-per-head, fp8-per-tensor, fp8-e5m2 (no scales) or "
                  "fp8-per-head-bf16q (per-head scales, bf16 Q)")
      ->capture_default_str();
  cmd->add_option("--calib", opt->calib,
                  "KV scales, required for the FP8 caches: kv_cache_calib.json, a quant-param "
                  "JSON, scale tensors (.safetensors) or a model folder carrying them");
  cmd->add_option("--kv-bf16-layers", opt->bf16_layers,
                  "FP8 caches: keep these layers' K/V in bf16, e.g. 0,31 (eval suggests a set)");
  cmd->add_option("--input-ids", opt->inputs,
                  "Prompt token ids, comma separated; repeat for a batch of prompts (prints ids)");
  cmd->add_option("--prompt", opt->prompts,
                  "Prompt text; repeat for a batch of prompts (prints the generated text)");
  add_tokenizer_option(cmd, opt->tokenizer);
  cmd->add_option("--max-new", opt->max_new, "Tokens to generate per prompt")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dump-logits", opt->dump_logits,
                  "With one prompt: write the logits of every prompt position and of every "
                  "decode step as raw float32 [prompt + max_new - 1, vocab] (for the oracle)");
  add_device_and_tp_options(cmd, opt->device, opt->tp);
  cmd->add_flag("--exact-tp", opt->exact_tp,
                "Fixed-order GEMMs and tp-independent attention splits (slower): the logits at "
                "any --tp are the --tp 1 --exact-tp logits bit for bit");
  add_cuda_graph_options(cmd, opt->cuda_graph,
                         "GPU: record each decode step's launches once as a CUDA graph and replay "
                         "it (fewer launch gaps; the same tokens and logits as without). Prefill "
                         "stays eager");
  cmd->callback([opt]() {
    const KvScheme scheme = parse_scheme(opt->kv);
    if (opt->inputs.empty() == opt->prompts.empty()) {
      throw fp8kv::Error(opt->inputs.empty() ? "give --prompt TEXT or --input-ids IDS"
                                             : "--prompt and --input-ids: give one kind");
    }
    std::vector<std::vector<int32_t>> prompts;
    for (const auto& s : opt->inputs) prompts.push_back(parse_ids(s));
    // Text prompts: tokenized before the model load, so that a missing tokenizer fails fast.
    std::optional<Tokenizer> tok;
    if (!opt->prompts.empty()) {
      tok.emplace(load_tokenizer(opt->tokenizer, opt->model, "--prompt"));
      for (const auto& p : opt->prompts) {
        prompts.push_back(tok->encode(p));
        if (prompts.back().empty()) throw fp8kv::Error("--prompt \"\": an empty prompt");
      }
    } else if (opt->tokenizer) {
      throw fp8kv::Error("--tokenizer is for --prompt");
    }
    // Refuse a missing calibration file before the (possibly long) model load.
    if (has_kv_scales(scheme) && !opt->calib) {
      throw fp8kv::Error(std::string("--kv ") + scheme_name(scheme) +
                         " needs --calib FILE (a kv_cache_calib.json made by `fp8kv calibrate`); "
                         "refusing to run with scales of 1.0");
    }
    if (!has_kv_scales(scheme) && opt->calib) {
      throw fp8kv::Error(is_fp8(scheme)
                             ? std::string("--calib: the --kv ") + scheme_name(scheme) +
                                   " cache takes no calibration file (no scales: K/V are rounded "
                                   "to e5m2 as they are)"
                             : std::string("--calib is only for the FP8 caches with scales"));
    }
    std::vector<int> bf16_layers;
    if (opt->bf16_layers) {
      if (!is_fp8(scheme)) throw fp8kv::Error("--kv-bf16-layers is only for the FP8 caches");
      bf16_layers = parse_layer_list(*opt->bf16_layers, "--kv-bf16-layers");
    }
    run_tensor_parallel(opt->tp, opt->device, [&](Communicator& comm) {
      const bool rank0 = comm.rank() == 0;
      const bool graph = use_cuda_graph(opt->cuda_graph, opt->device, opt->tp);
      Device dev = make_device(opt->device, /*own_stream=*/graph);
      Backend* backend = dev.backend.get();
      ModelOps* ops = dev.ops.get();
      auto model = Model::load(opt->model, *backend, rank0, dev.weights, opt->tp, comm.rank());
      RunnerOptions ro;
      ro.scheme = scheme;
      if (has_kv_scales(scheme)) {
        ro.scales = load_scales_for_model(*opt->calib, model->config(), scheme, model->shard());
      }
      int longest = 0;
      for (const auto& p : prompts) longest = std::max(longest, static_cast<int>(p.size()));
      ro.max_len = longest + opt->max_new;
      ro.max_requests = static_cast<int>(prompts.size());
      ro.num_slots = static_cast<int64_t>(ro.max_len) * ro.max_requests;
      ro.comm = &comm;
      ro.exact_tp = opt->exact_tp;
      ro.cuda_graph = graph;
      ro.bf16_layers = bf16_layers;
      // Where the scales came from: fp8-per-head quantizes Q with the file's static scales when
      // it has them; a per_tensor file serves the per-head schemes broadcast.
      std::string scales_note = fp8_q(scheme) ? (ro.scales->q ? ", static Q scales (q_calibration)"
                                                              : ", dynamic Q scales")
                                              : "";
      if (ro.scales && ro.scales->broadcast_from_per_tensor) {
        scales_note += ", K/V scales broadcast from a per_tensor file";
      }
      ModelRunner runner(*model, *backend, *ops, std::move(ro));
      const auto t0 = std::chrono::steady_clock::now();
      const auto out = opt->dump_logits ? generate_dumping_logits(runner, prompts, opt->max_new,
                                                                  model->config().vocab_size,
                                                                  *opt->dump_logits, rank0)
                                        : runner.generate(prompts, opt->max_new);
      const double sec =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!rank0) return;
      for (size_t p = 0; p < out.size(); ++p) {
        if (tok) {  // the prompt and its continuation
          if (out.size() > 1) std::printf("=== prompt %zu\n", p + 1);
          std::printf("%s%s\n", opt->prompts[p].c_str(), tok->decode(out[p]).c_str());
          continue;
        }
        std::string line;
        for (size_t i = 0; i < out[p].size(); ++i) {
          line += (i ? "," : "") + std::to_string(out[p][i]);
        }
        std::printf("%s\n", line.c_str());
      }
      const std::string tp_note = opt->tp > 1 ? " (tp " + std::to_string(opt->tp) + ")" : "";
      std::fprintf(stderr, "generated %zu x %d tokens with a %s cache%s in %.2f s%s\n", out.size(),
                   opt->max_new, scheme_name(scheme), scales_note.c_str(), sec, tp_note.c_str());
    });
  });
}

}  // namespace fp8kv::cli
