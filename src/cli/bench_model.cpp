// fp8kv bench-model: prefill and decode throughput of the model runner with each KV cache.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

void add_bench_model(CLI::App& app) {
  struct Opts {
    std::string model;
    std::vector<std::string> kv = {"bf16", "fp8-per-tensor", "fp8-per-head"};
    int batch = 4;
    int prompt_len = 128;
    int decode = 16;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "bench-model", "Prefill and decode throughput of the model runner with each KV cache");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  cmd->add_option("--kv", opt->kv, "KV caches to run (bf16, fp8-per-tensor, fp8-per-head)")
      ->capture_default_str();
  cmd->add_option("--batch", opt->batch, "Requests per batch")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--prompt-len", opt->prompt_len, "Prompt tokens per request")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--decode", opt->decode, "Decode steps after the prefill")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  cmd->callback([opt]() {
    using clock = std::chrono::steady_clock;
    auto backend = make_cpu_backend();
    auto ops = make_cpu_model_ops();
    auto model = Model::load(opt->model, *backend, true);
    const ModelConfig& c = model->config();
    TokenData prompts;
    for (int b = 0; b < opt->batch; ++b) {
      std::vector<int32_t> p;
      for (int i = 0; i < opt->prompt_len; ++i) {
        p.push_back(static_cast<int32_t>((1000003ll * b + 7919ll * i + 17) % c.vocab_size));
      }
      prompts.push_back(std::move(p));
    }
    std::printf("%s: batch %d, prompt %d, decode %d (backend %s)\n", opt->model.c_str(), opt->batch,
                opt->prompt_len, opt->decode, backend->name().c_str());
    std::printf("%-16s %14s %14s %16s\n", "KV cache", "prefill tok/s", "decode tok/s",
                "KV bytes/token");
    for (const std::string& name : opt->kv) {
      const KvScheme scheme = parse_scheme(name);
      RunnerOptions ro;
      ro.scheme = scheme;
      ro.max_requests = opt->batch;
      ro.max_len = opt->prompt_len + opt->decode;
      ro.num_slots = static_cast<int64_t>(ro.max_len) * opt->batch;
      if (is_fp8(scheme)) {
        // Throughput does not depend on the scale values; calibrate on the prompts themselves.
        CalibrateOptions co;
        co.quant_type =
            scheme == KvScheme::kFp8PerHead ? QuantType::kPerHead : QuantType::kPerTensor;
        co.batch_size = opt->batch;
        ro.scales = slice_for_rank(calibrate(*model, *backend, *ops, prompts, co).data, 1, 0);
      }
      ModelRunner runner(*model, *backend, *ops, std::move(ro));
      std::vector<int> reqs;
      for (int b = 0; b < opt->batch; ++b) reqs.push_back(runner.add_request());
      const auto t0 = clock::now();
      runner.forward(reqs, prompts, LogitRows::kLast);
      const auto t1 = clock::now();
      std::vector<std::vector<int32_t>> step(static_cast<size_t>(opt->batch),
                                             std::vector<int32_t>{1});
      for (int i = 0; i < opt->decode; ++i) runner.forward(reqs, step, LogitRows::kLast);
      const auto t2 = clock::now();
      const double prefill = std::chrono::duration<double>(t1 - t0).count();
      const double decode = std::chrono::duration<double>(t2 - t1).count();
      const double bytes = 2.0 * c.num_layers * c.num_kv_heads * c.head_dim * kv_elem_bytes(scheme);
      std::printf("%-16s %14.1f %14.1f %16.0f\n", scheme_name(scheme),
                  opt->batch * opt->prompt_len / prefill, opt->batch * opt->decode / decode, bytes);
    }
  });
}

}  // namespace fp8kv::cli
