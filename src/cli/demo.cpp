// fp8kv demo: the whole workflow on a tiny random-weight model, on the CPU, in a few minutes:
// make the model, sample token data from it, calibrate both FP8 schemes, evaluate, generate.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/make_model.h"
#include "fp8kv/model.h"
#include "fp8kv/token_data.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

namespace {

// `count` sequences of `len` tokens sampled from the model at temperature 1, each from a
// random first token: text the model finds plausible, so perplexities mean something.
TokenData sample_data(const Model& model, Backend& backend, ModelOps& ops, int count, int len,
                      uint64_t seed) {
  RunnerOptions ro;
  ro.max_requests = count;
  ro.max_len = len;
  ro.num_slots = static_cast<int64_t>(count) * len;
  ModelRunner runner(model, backend, ops, std::move(ro));
  TokenData prompts;
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 12345;
  for (int i = 0; i < count; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    prompts.push_back({static_cast<int32_t>((s >> 33) % model.config().vocab_size)});
  }
  const auto out = runner.generate(prompts, len - 1, 1.0f, seed);
  for (int i = 0; i < count; ++i) {
    prompts[static_cast<size_t>(i)].insert(prompts[static_cast<size_t>(i)].end(),
                                           out[static_cast<size_t>(i)].begin(),
                                           out[static_cast<size_t>(i)].end());
  }
  return prompts;
}

std::string join(const std::vector<int32_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

void add_demo(CLI::App& app) {
  struct Opts {
    std::string out;
    int sequences = 16;
    int len = 192;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "demo", "Tiny model end to end on the CPU: make, calibrate both FP8 schemes, evaluate");
  cmd->add_option("--out", opt->out,
                  "Folder for the model, data and calibration files "
                  "(default: a new folder under the temp dir)");
  cmd->add_option("--sequences", opt->sequences, "Sequences of calibration and of eval data")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--len", opt->len, "Tokens per sequence")
      ->capture_default_str()
      ->check(CLI::Range(2, 8192));
  cmd->callback([opt]() {
    namespace fs = std::filesystem;
    const auto t0 = std::chrono::steady_clock::now();
    std::string dir = opt->out;
    if (dir.empty()) {
      std::string tmpl = (fs::temp_directory_path() / "fp8kv-demo-XXXXXX").string();
      if (!::mkdtemp(tmpl.data())) throw fp8kv::Error("demo: cannot create a folder from " + tmpl);
      dir = tmpl;
    }
    fs::create_directories(dir);
    const std::string model_dir = dir + "/model";
    const std::string calib_data = dir + "/calib.jsonl", eval_data = dir + "/eval.jsonl";
    const std::string per_head = dir + "/kv_cache_calib_per_head.json";
    const std::string per_tensor = dir + "/kv_cache_calib_per_tensor.json";

    std::printf("[1/5] make-model --preset tiny -> %s\n", model_dir.c_str());
    std::fflush(stdout);
    make_model(model_dir, model_preset("tiny"));
    auto backend = make_cpu_backend();
    auto ops = make_cpu_model_ops();
    auto model = Model::load(model_dir, *backend);
    const ModelConfig& c = model->config();
    std::printf(
        "      %s: %d layers, hidden %d, %d Q / %d KV heads of %d, vocab %d; K has "
        "outlier channels\n",
        c.architecture.c_str(), c.num_layers, c.hidden_size, c.num_q_heads, c.num_kv_heads,
        c.head_dim, c.vocab_size);

    std::printf("[2/5] sampling token data from the model: %d + %d sequences of %d tokens\n",
                opt->sequences, opt->sequences, opt->len);
    std::fflush(stdout);
    write_token_data(calib_data, sample_data(*model, *backend, *ops, opt->sequences, opt->len, 1));
    write_token_data(eval_data, sample_data(*model, *backend, *ops, opt->sequences, opt->len, 2));
    std::printf("      wrote %s and %s\n", calib_data.c_str(), eval_data.c_str());
    const TokenData calib_tokens = load_token_data(calib_data, c.vocab_size);
    const TokenData eval_tokens = load_token_data(eval_data, c.vocab_size);

    std::printf("[3/5] calibrate --scheme per-head and per-tensor on %s\n", calib_data.c_str());
    std::fflush(stdout);
    for (QuantType qt : {QuantType::kPerHead, QuantType::kPerTensor}) {
      CalibrateOptions co;
      co.quant_type = qt;
      co.show_progress = true;
      const CalibrateResult r = calibrate(*model, *backend, *ops, calib_tokens, co);
      const std::string& path = qt == QuantType::kPerHead ? per_head : per_tensor;
      write_calib(path, r.data);
      std::printf("      %s: %d passes observed, wrote %s\n", quant_type_name(qt), r.count,
                  path.c_str());
    }

    std::printf("[4/5] eval on %s (held out from calibration)\n", eval_data.c_str());
    std::fflush(stdout);
    EvalOptions eo;
    eo.show_progress = true;
    const EvalResult r = evaluate(*model, *backend, *ops, eval_tokens,
                                  load_scales_for_model(per_tensor, c, KvScheme::kFp8PerTensor),
                                  load_scales_for_model(per_head, c, KvScheme::kFp8PerHead), eo);
    std::printf("\n%s\n", format_eval_table(r).c_str());

    std::printf("[5/5] generate: greedy, 24 new tokens after the first 8 of an eval sequence\n");
    const std::vector<int32_t> prompt(
        eval_tokens[0].begin(),
        eval_tokens[0].begin() + std::min<size_t>(8, eval_tokens[0].size()));
    for (KvScheme s : {KvScheme::kBf16, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
      RunnerOptions ro;
      ro.scheme = s;
      if (s == KvScheme::kFp8PerTensor) ro.scales = load_scales_for_model(per_tensor, c, s);
      if (s == KvScheme::kFp8PerHead) ro.scales = load_scales_for_model(per_head, c, s);
      ro.max_requests = 1;
      ro.max_len = 64;
      ro.num_slots = 64;
      ModelRunner runner(*model, *backend, *ops, std::move(ro));
      std::printf("      %-15s %s\n", scheme_name(s),
                  join(runner.generate({prompt}, 24)[0]).c_str());
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("\ndemo done in %.1f s; files in %s\n", sec, dir.c_str());
    std::printf("next: fp8kv generate --model %s --kv fp8-per-head --calib %s --input-ids %s\n",
                model_dir.c_str(), per_head.c_str(), join(prompt).c_str());
  });
}

}  // namespace fp8kv::cli
