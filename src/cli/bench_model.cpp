// fp8kv bench model: prefill and decode throughput of the model runner with each KV cache.
//
// Per KV cache: a warm-up prefill (untimed, released), the timed prefill of --prompt-len tokens
// per request, then — with --context L — the rest of the context up to L tokens per request
// written as pseudo-random K/V straight into the pool (ModelRunner::append_random_context: a
// long context in seconds, not a long prefill), then --warmup untimed and --decode timed greedy
// decode steps. Each step ends with its B next-token ids copied back to the host, which waits
// for the step's GPU work: the times are complete steps. An FP8 cache without a calibration file
// is calibrated on the prompts first; that pass is timed too (calibration tok/s, its own line).
// With CUDA graphs (the default with --device cuda at --tp 1; --no-cuda-graph: eager only) the
// same runner then runs --warmup and --decode more steps with its decode
// steps recorded and replayed as CUDA graphs (RunnerOptions::cuda_graph; the first warm-up
// step of a launch configuration runs eagerly, the next one records) and prints their tok/s
// on a line of its own beside the eager figure of the table; both runs use the backend on its
// own stream and cuBLAS on its own workspace, so the two differ only by the graphs (and by the
// graph run's context being warmup + decode tokens longer).
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
#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

void add_bench_model(CLI::App& app) {
  struct Opts {
    std::string model, device = "auto";
    std::vector<std::string> kv = {"bf16", "fp8-per-tensor", "fp8-per-head"};
    std::optional<std::string> per_head, per_tensor;
    std::optional<std::string> bf16_layers;
    int batch = 4;
    int prompt_len = 128;
    int context = 0;
    bool context_by_steps = false;
    std::string slot_policy = "pages";
    int warmup = 2;
    int decode = 16;
    int tp = 1;
    CudaGraphChoice cuda_graph;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "model", "Prefill and decode throughput of the model runner with each KV cache");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  cmd->add_option("--kv", opt->kv,
                  "KV caches to run (bf16, fp8-per-tensor, fp8-per-head, fp8-e5m2, "
                  "fp8-per-head-bf16q)")
      ->capture_default_str();
  cmd->add_option("--batch", opt->batch, "Requests per batch")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));
  cmd->add_option("--prompt-len", opt->prompt_len, "Prompt tokens per request (timed prefill)")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--context", opt->context,
                  "Tokens per request in the cache when decoding starts (>= --prompt-len; the "
                  "part past the prompt is random K/V written into the pool). Default: the prompt")
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_flag("--context-by-steps", opt->context_by_steps,
                "Take the context's slots a token per request per step, as a batch that decodes "
                "grows (a long-running server's slot table), instead of a run per request");
  cmd->add_option("--slot-policy", opt->slot_policy,
                  "How the pool's slots go to tokens: pages (64 consecutive slots per request "
                  "window) or tokens (LightLLM's order: any free slot, the last freed first)")
      ->capture_default_str()
      ->check(CLI::IsMember({"pages", "tokens"}));
  cmd->add_option("--warmup", opt->warmup, "Untimed decode steps before the timed ones")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--decode", opt->decode, "Timed decode steps")
      ->capture_default_str()
      ->check(CLI::Range(1, 65536));
  cmd->add_option("--per-head-calib", opt->per_head,
                  "Per-head scales, any format convert reads; a per-tensor file is broadcast to "
                  "every KV head (default: calibrate on prompts)");
  cmd->add_option("--per-tensor-calib", opt->per_tensor,
                  "Per-tensor scales, any format convert reads (default: calibrate on prompts)");
  cmd->add_option("--kv-bf16-layers", opt->bf16_layers,
                  "Keep these layers' K/V in bf16 in the FP8 caches, e.g. 0,31");
  add_device_and_tp_options(cmd, opt->device, opt->tp);
  add_cuda_graph_options(cmd, opt->cuda_graph,
                         "GPU: after the eager decode steps, time as many again replayed as CUDA "
                         "graphs (each decode step recorded once per launch configuration); "
                         "prints a 'graph' line with its tok/s beside the eager figure");
  cmd->callback([opt]() {
    using clock = std::chrono::steady_clock;
    const int context = opt->context > 0 ? opt->context : opt->prompt_len;
    if (context < opt->prompt_len) {
      throw fp8kv::Error("--context " + std::to_string(context) + " is shorter than --prompt-len " +
                         std::to_string(opt->prompt_len));
    }
    std::vector<KvScheme> schemes;
    for (const std::string& name : opt->kv) schemes.push_back(parse_scheme(name));
    std::vector<int> bf16_layers;
    if (opt->bf16_layers) bf16_layers = parse_layer_list(*opt->bf16_layers, "--kv-bf16-layers");
    run_tensor_parallel(opt->tp, opt->device, [&](Communicator& comm) {
      const bool rank0 = comm.rank() == 0;
      // Rank 0 prints; every rank runs the same calls (the all-reduces keep them in step).
      auto say = [rank0](const char* fmt, auto... args) {
        if (rank0) std::printf(fmt, args...);
      };
      const bool graph = use_cuda_graph(opt->cuda_graph, opt->device, opt->tp);
      Device dev = make_device(opt->device, /*own_stream=*/graph);
      Backend& backend = *dev.backend;
      ModelOps& ops = *dev.ops;
      auto model = Model::load(opt->model, backend, rank0, dev.weights, opt->tp, comm.rank());
      const ModelConfig& c = model->config();
      TokenData prompts;
      for (int b = 0; b < opt->batch; ++b) {
        std::vector<int32_t> p;
        for (int i = 0; i < opt->prompt_len; ++i) {
          p.push_back(static_cast<int32_t>((1000003ll * b + 7919ll * i + 17) % c.vocab_size));
        }
        prompts.push_back(std::move(p));
      }
      say("%s: batch %d, prompt %d, context %d%s, decode %d (+%d warm-up) steps, slot %s\n",
          opt->model.c_str(), opt->batch, opt->prompt_len, context,
          opt->context_by_steps ? " (by steps)" : "", opt->decode, opt->warmup,
          opt->slot_policy.c_str());
      say("backend %s, %s weights (%.2f GiB%s)\n", backend.name().c_str(),
          weight_dtype_name(model->weight_dtype()),
          static_cast<double>(model->weight_bytes()) / (1ull << 30),
          opt->tp > 1 ? (" per rank, tp " + std::to_string(opt->tp)).c_str() : "");
      say("%-16s %14s %14s %16s %13s\n", "KV cache", "prefill tok/s", "decode tok/s",
          "KV bytes/token", opt->tp > 1 ? "pool GiB/rank" : "KV pool GiB");
      std::fflush(stdout);
      double bf16_decode = 0.0;
      for (const KvScheme scheme : schemes) {
        RunnerOptions ro;
        ro.scheme = scheme;
        double calib_seconds = 0.0;  // the calibrate pass on the prompts, when no file is given
        int64_t calib_tokens = 0;
        ro.max_requests = opt->batch;
        ro.slot_policy = opt->slot_policy == "tokens" ? SlotPolicy::kTokens : SlotPolicy::kPages;
        ro.max_len = context + (graph ? 2 : 1) * (opt->warmup + opt->decode);
        ro.num_slots = static_cast<int64_t>(ro.max_len) * opt->batch;
        if (has_kv_scales(scheme)) {
          const std::optional<std::string>& file =
              calib_quant_type(scheme) == QuantType::kPerHead ? opt->per_head : opt->per_tensor;
          if (file) {
            ro.scales = load_scales_for_model(*file, c, scheme, model->shard());
          } else {
            // Throughput does not depend on the scale values; calibrate on the prompts themselves.
            CalibrateOptions co;
            co.quant_type = *calib_quant_type(scheme);
            co.batch_size = opt->batch;
            co.comm = &comm;
            co.exact_tp = false;  // the values do not matter here
            // Timed as a user runs it: the first passes of this runner included.
            const auto c0 = clock::now();
            const CalibrateResult r = calibrate(*model, backend, ops, prompts, co);
            calib_seconds = std::chrono::duration<double>(clock::now() - c0).count();
            calib_tokens = r.tokens;
            ro.scales = slice_for_rank(r.data, opt->tp, comm.rank());
          }
        }
        ro.comm = &comm;
        if (is_fp8(scheme)) ro.bf16_layers = bf16_layers;
        const int bf16_count = static_cast<int>(ro.bf16_layers.size());
        // With graphs the runner is made with graphs on (cuBLAS gets its workspace for
        // both runs) and they are turned off until the graph run.
        ro.cuda_graph = graph;
        ModelRunner runner(*model, backend, ops, std::move(ro));
        runner.set_cuda_graph(false);
        std::vector<int> reqs;
        auto add_all = [&] {
          reqs.clear();
          for (int b = 0; b < opt->batch; ++b) reqs.push_back(runner.add_request());
        };
        // Warm-up prefill: scratch buffers, cuBLAS heuristics and workspaces settle here.
        add_all();
        runner.forward_greedy(reqs, prompts);
        for (int r : reqs) runner.release(r);
        add_all();
        const auto t0 = clock::now();
        std::vector<int32_t> next = runner.forward_greedy(reqs, prompts);
        const auto t1 = clock::now();
        runner.append_random_context(reqs, context - opt->prompt_len, 1, opt->context_by_steps);
        std::vector<std::vector<int32_t>> step(static_cast<size_t>(opt->batch));
        auto decode_step = [&] {
          for (size_t b = 0; b < step.size(); ++b) step[b].assign(1, next[b]);
          next = runner.forward_greedy(reqs, step);
        };
        for (int i = 0; i < opt->warmup; ++i) decode_step();
        const auto t2 = clock::now();
        for (int i = 0; i < opt->decode; ++i) decode_step();
        const auto t3 = clock::now();
        const double prefill = std::chrono::duration<double>(t1 - t0).count();
        const double decode = std::chrono::duration<double>(t3 - t2).count();
        const double decode_rate = opt->batch * opt->decode / decode;
        if (scheme == KvScheme::kBf16) bf16_decode = decode_rate;
        const double bytes = 2.0 * c.num_kv_heads * c.head_dim *
                             ((c.num_layers - bf16_count) * kv_elem_bytes(scheme) +
                              bf16_count * kv_elem_bytes(KvScheme::kBf16));
        say("%-16s %14.1f %14.1f %16.0f %13.2f\n", scheme_name(scheme),
            opt->batch * opt->prompt_len / prefill, decode_rate, bytes,
            static_cast<double>(runner.kv_pool_bytes()) / (1ull << 30));
        if (scheme != KvScheme::kBf16 && bf16_decode > 0) {
          say("%-16s decode %.3f x bf16\n", "", decode_rate / bf16_decode);
        }
        if (graph) {
          runner.set_cuda_graph(true);
          for (int i = 0; i < opt->warmup; ++i) decode_step();
          const auto g0 = clock::now();
          for (int i = 0; i < opt->decode; ++i) decode_step();
          const auto g1 = clock::now();
          const double graph_rate =
              opt->batch * opt->decode / std::chrono::duration<double>(g1 - g0).count();
          const GraphStats& gs = runner.graph_stats();
          // Its own line, first word "graph" (scripts read the table rows by their first field).
          say("%-16s graph decode %.1f tok/s (%.3f x eager; %lld steps recorded, %lld replayed, "
              "%lld eager)\n",
              "", graph_rate, graph_rate / decode_rate, static_cast<long long>(gs.captures),
              static_cast<long long>(gs.replays), static_cast<long long>(gs.eager_decode));
        }
        // Its own line, first word "calibration": scripts read the rows by their first field.
        if (calib_tokens > 0) {
          say("%-16s calibration %.1f tok/s (%lld tokens in %.3f s)\n", "",
              static_cast<double>(calib_tokens) / std::max(calib_seconds, 1e-9),
              static_cast<long long>(calib_tokens), calib_seconds);
        }
        std::fflush(stdout);
      }
    });
  });
}

}  // namespace fp8kv::cli
