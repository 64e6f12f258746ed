// fp8kv demo: a small trained model end to end on the CPU, in a minute or two: calibrate both
// FP8 schemes on one part of its text, evaluate on held-out text, and generate a continuation
// of a prompt with each KV cache.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "cli/text_input.h"
#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/token_data.h"
#include "fp8kv/tokenizer.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

namespace {

// The first `max_sequences` sequences of `path`'s text cut into `seq_len` tokens.
TokenData text_slice(const std::string& path, const Tokenizer& tok, int seq_len, int max_sequences,
                     int vocab_size) {
  TokenData d = load_text_data(path, tok, seq_len, vocab_size);
  if (static_cast<int>(d.size()) > max_sequences) d.resize(static_cast<size_t>(max_sequences));
  return d;
}

// `text` with each line after the first indented by `indent`, for the side-by-side blocks.
std::string indented(const std::string& text, const std::string& indent) {
  std::string out;
  for (char ch : text) {
    out += ch;
    if (ch == '\n') out += indent;
  }
  return out;
}

}  // namespace

void add_demo(CLI::App& app) {
  struct Opts {
    std::string model, out, calib_text, eval_text;
    std::string prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n";
    int seq_len = 256;
    int calib_sequences = 64;
    int eval_sequences = 16;
    int max_new = 48;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "demo",
      "A trained model end to end on the CPU: calibrate both FP8 schemes on text, evaluate on "
      "held-out text, generate with each KV cache");
  cmd->add_option("--model", opt->model,
                  "Model folder with tokenizer.json, calib.txt and heldout.txt (the repo's "
                  "models/tiny-stdlib-llama)")
      ->required();
  cmd->add_option("--calib-text", opt->calib_text, "Calibration text (default: MODEL/calib.txt)");
  cmd->add_option("--eval-text", opt->eval_text,
                  "Held-out evaluation text (default: MODEL/heldout.txt)");
  cmd->add_option("--seq-len", opt->seq_len, "Tokens per sequence cut from the texts")
      ->capture_default_str()
      ->check(CLI::Range(2, 8192));
  cmd->add_option("--calib-sequences", opt->calib_sequences,
                  "Calibrate on at most this many sequences of the calibration text")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--eval-sequences", opt->eval_sequences,
                  "Evaluate on at most this many sequences of the held-out text")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--prompt", opt->prompt, "Prompt to continue with each KV cache")
      ->capture_default_str();
  cmd->add_option("--max-new", opt->max_new, "Tokens to generate")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--out", opt->out,
                  "Folder for the calibration files (default: a new folder under the temp dir)");
  cmd->callback([opt]() {
    namespace fs = std::filesystem;
    const auto t0 = std::chrono::steady_clock::now();
    const std::string m = opt->model;
    const std::string calib_text = opt->calib_text.empty() ? m + "/calib.txt" : opt->calib_text;
    const std::string eval_text = opt->eval_text.empty() ? m + "/heldout.txt" : opt->eval_text;
    for (const std::string& f : {calib_text, eval_text}) {
      if (!fs::is_regular_file(f)) throw fp8kv::Error("demo: text file " + f + " does not exist");
    }
    const Tokenizer tok = load_tokenizer(std::nullopt, m, "demo");
    const std::vector<int32_t> prompt = tok.encode(opt->prompt);
    if (prompt.empty()) throw fp8kv::Error("demo: --prompt \"\": an empty prompt");
    std::string dir = opt->out;
    if (dir.empty()) {
      std::string tmpl = (fs::temp_directory_path() / "fp8kv-demo-XXXXXX").string();
      if (!::mkdtemp(tmpl.data())) throw fp8kv::Error("demo: cannot create a folder from " + tmpl);
      dir = tmpl;
    }
    fs::create_directories(dir);
    const std::string per_head = dir + "/kv_cache_calib_per_head.json";
    const std::string per_tensor = dir + "/kv_cache_calib_per_tensor.json";

    std::printf("[1/4] load %s\n", m.c_str());
    std::fflush(stdout);
    auto backend = make_cpu_backend();
    auto ops = make_cpu_model_ops();
    auto model = Model::load(m, *backend);
    const ModelConfig& c = model->config();
    std::printf("      %s: %d layers, hidden %d, %d Q / %d KV heads of %d, vocab %d\n",
                c.architecture.c_str(), c.num_layers, c.hidden_size, c.num_q_heads, c.num_kv_heads,
                c.head_dim, c.vocab_size);
    const TokenData calib_tokens =
        text_slice(calib_text, tok, opt->seq_len, opt->calib_sequences, c.vocab_size);
    const TokenData eval_tokens =
        text_slice(eval_text, tok, opt->seq_len, opt->eval_sequences, c.vocab_size);

    std::printf(
        "[2/4] calibrate --scheme per-head and per-tensor on %s: %lld tokens in %zu "
        "sequences\n",
        calib_text.c_str(), static_cast<long long>(count_tokens(calib_tokens)),
        calib_tokens.size());
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

    std::printf("[3/4] eval on held-out %s: %lld tokens in %zu sequences\n", eval_text.c_str(),
                static_cast<long long>(count_tokens(eval_tokens)), eval_tokens.size());
    std::fflush(stdout);
    EvalOptions eo;
    eo.show_progress = true;
    const EvalResult r = evaluate(*model, *backend, *ops, eval_tokens,
                                  load_scales_for_model(per_tensor, c, KvScheme::kFp8PerTensor),
                                  load_scales_for_model(per_head, c, KvScheme::kFp8PerHead), eo);
    std::printf("\n%s\n", format_eval_table(r).c_str());

    std::printf("[4/4] generate: greedy, %d new tokens with each KV cache\n", opt->max_new);
    std::string shown = opt->prompt;
    if (!shown.empty() && shown.back() == '\n') shown.pop_back();  // the block's own line end
    std::printf("      prompt:\n      | %s\n", indented(shown, "      | ").c_str());
    std::vector<int32_t> bf16_out;
    for (KvScheme s : {KvScheme::kBf16, KvScheme::kFp8PerTensor, KvScheme::kFp8PerHead}) {
      RunnerOptions ro;
      ro.scheme = s;
      if (s == KvScheme::kFp8PerTensor) ro.scales = load_scales_for_model(per_tensor, c, s);
      if (s == KvScheme::kFp8PerHead) ro.scales = load_scales_for_model(per_head, c, s);
      ro.max_requests = 1;
      ro.max_len = static_cast<int>(prompt.size()) + opt->max_new;
      ro.num_slots = ro.max_len;
      ModelRunner runner(*model, *backend, *ops, std::move(ro));
      const std::vector<int32_t> out = runner.generate({prompt}, opt->max_new)[0];
      std::string same;
      if (s == KvScheme::kBf16) {
        bf16_out = out;
      } else {
        const size_t n = static_cast<size_t>(
            std::mismatch(out.begin(), out.end(), bf16_out.begin(), bf16_out.end()).first -
            out.begin());
        same = n == out.size() ? " (the same tokens as bf16)"
                               : " (the same as bf16 for " + std::to_string(n) + " of " +
                                     std::to_string(out.size()) + " tokens)";
      }
      std::printf("\n      -- %s cache%s:\n      | %s\n", scheme_name(s), same.c_str(),
                  indented(tok.decode(out), "      | ").c_str());
    }
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("\ndemo done in %.1f s; calibration files in %s\n", sec, dir.c_str());
    std::printf("next: fp8kv generate --model %s --kv fp8-per-head --calib %s --prompt \"...\"\n",
                m.c_str(), per_head.c_str());
  });
}

}  // namespace fp8kv::cli
