// fp8kv calibrate: run a model over token data with a bf16 cache, observe K/V abs-max, write
// kv_cache_calib.json.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include "cli/commands.h"
#include "cli/parallel.h"
#include "cli/text_input.h"
#include "fp8kv/backend.h"
#include "fp8kv/calib.h"
#include "fp8kv/error.h"
#include "fp8kv/model.h"
#include "fp8kv/scheme.h"
#include "fp8kv/token_data.h"
#include "fp8kv/workflows.h"

namespace fp8kv::cli {

void add_calibrate(CLI::App& app) {
  struct Opts {
    std::string model, data, scheme = "per-head", out = "kv_cache_calib.json", device = "auto";
    std::optional<int> warmup, count;
    int batch = 4;
    int tp = 1;
    int generate = 0;
    bool exact_tp = false;
    bool rank_layout = false;
    bool q_scales = false;
    TextInput text;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Observe K/V abs-max over token data and write kv_cache_calib.json");
  cmd->add_option("--model", opt->model, "Model folder (config.json + *.safetensors)")->required();
  add_data_options(cmd, opt->data, opt->text);
  cmd->add_option("--scheme", opt->scheme, "per-head or per-tensor")->capture_default_str();
  cmd->add_option("--out", opt->out, "Calibration file to write")->capture_default_str();
  cmd->add_option("--warmup", opt->warmup,
                  "Forward passes each layer skips first (default 0, or FP8KV_CALIB_WARMUP, or "
                  "LightLLM's KV_QUANT_CALIBRATION_WARMUP_COUNT)");
  cmd->add_option(
      "--count", opt->count,
      "Forward passes each layer observes (default: all the data gives after the warmup, or "
      "FP8KV_CALIB_COUNT, or LightLLM's KV_QUANT_CALIBRATION_INFERENCE_COUNT)");
  cmd->add_option("--batch", opt->batch, "Sequences per prefill pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--generate", opt->generate,
                  "Greedy decode steps after each prefill batch, their K/V writes observed too "
                  "(each step is one pass for --warmup / --count)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--lightllm-rank-layout", opt->rank_layout,
                "Write LightLLM's per-rank layout (num_head = KV heads per rank x --tp, each "
                "head once per rank that holds it) instead of one column per KV head; the "
                "same file when --tp <= KV heads");
  cmd->add_flag("--q-scales", opt->q_scales,
                "Per head only: also record Q's abs-max (after RoPE) per layer and KV head over "
                "the same passes and write static Q scales (LightLLM's q_calibration), which "
                "fp8-per-head then uses instead of dynamic ones");
  add_device_and_tp_options(cmd, opt->device, opt->tp);
  cmd->add_flag("--exact-tp", opt->exact_tp,
                "Sum every GEMM in one fixed order (slower), so that a --tp N file equals the "
                "--tp 1 --exact-tp file value for value; without it the fast GEMMs (cuBLAS on "
                "the GPU) can change the last bits of scales after layer 0 with --tp");
  cmd->callback([opt]() {
    check_data_choice(opt->data, opt->text, opt->model);
    const KvScheme scheme = parse_scheme(opt->scheme);
    if (!has_kv_scales(scheme)) {
      throw fp8kv::Error(std::string("calibrate: --scheme must be per-head or per-tensor (") +
                         scheme_name(scheme) + " has no scales to calibrate)");
    }
    run_tensor_parallel(opt->tp, opt->device, [&](Communicator& comm) {
      const bool rank0 = comm.rank() == 0;
      Device dev = make_device(opt->device);
      Backend* backend = dev.backend.get();
      ModelOps* ops = dev.ops.get();
      auto model = Model::load(opt->model, *backend, rank0, dev.weights, opt->tp, comm.rank());
      const TokenData data =
          load_data(opt->data, opt->text, opt->model, model->config().vocab_size, rank0);
      CalibrateOptions co;
      co.quant_type = *calib_quant_type(scheme);
      co.warmup = opt->warmup;
      co.count = opt->count;
      co.batch_size = opt->batch;
      co.show_progress = rank0;
      co.comm = &comm;
      co.exact_tp = opt->exact_tp;
      co.generate = opt->generate;
      co.q_scales = opt->q_scales;
      const CalibrateResult r = calibrate(*model, *backend, *ops, data, co);
      if (!rank0) return;
      // The rank layout repeats the merged scales: copies of a head are equal by construction
      // (the observer merged the ranks' replicas by max), so both files load to the same
      // per-rank scales.
      const CalibData file = opt->rank_layout ? to_rank_layout(r.data, opt->tp) : r.data;
      write_calib(opt->out, file);
      const auto mm = std::minmax_element(r.data.scales.begin(), r.data.scales.end());
      std::printf("calibrated %s (%s): %d layers x %d KV heads, %s scales in [%.4g, %.4g]\n",
                  opt->model.c_str(), r.data.architectures.c_str(), r.data.num_layers,
                  r.data.num_head, quant_type_name(r.data.quant_type), *mm.first, *mm.second);
      if (r.data.q_scales) {
        const auto qm =
            std::minmax_element(r.data.q_scales->scales.begin(), r.data.q_scales->scales.end());
        std::printf("static Q scales (q_calibration): %d layers x %d KV heads in [%.4g, %.4g]\n",
                    r.data.num_layers, r.data.q_scales->num_head, *qm.first, *qm.second);
      }
      std::printf(
          "observed %d forward passes per layer after %d warmup (%d run, %d of them "
          "decode steps; %lld tokens)\n",
          r.count, r.warmup, r.passes_run, r.decode_passes, static_cast<long long>(r.tokens));
      std::printf("warmup from %s; count from %s\n", r.warmup_source.c_str(),
                  r.count_source.c_str());
      if (opt->tp > 1) std::printf("tensor parallel: %d ranks\n", opt->tp);
      if (opt->rank_layout) {
        const int copies = file.num_head / r.data.num_head;
        const std::string what =
            copies > 1 ? ", each KV head written by " + std::to_string(copies) + " ranks"
                       : " (the same as the merged layout: no head is replicated)";
        std::printf("layout: LightLLM's per-rank layout for %d ranks: num_head %d%s\n", opt->tp,
                    file.num_head, what.c_str());
      }
      std::printf("wrote %s\n", opt->out.c_str());
    });
  });
}

}  // namespace fp8kv::cli
