// fp8kv make-model: a deterministic random-weight model folder (config.json + bf16 safetensors).
#include "fp8kv/make_model.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <memory>
#include <string>

#include "cli/commands.h"

namespace fp8kv::cli {

void add_make_model(CLI::App& app) {
  struct Opts {
    std::string dir;
    std::string preset = "tiny";
    uint64_t seed = 0;
    uint64_t shard_mb = 5000;
  };
  auto opt = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "make-model", "Write a random-weight model in the Hugging Face layout (no download needed)");
  cmd->add_option("dir", opt->dir, "Output folder")->required();
  std::string presets;
  for (const auto& n : model_preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  cmd->add_option("--preset", opt->preset, "Model shape: " + presets)->capture_default_str();
  cmd->add_option("--seed", opt->seed, "Random seed")->capture_default_str();
  cmd->add_option("--shard-mb", opt->shard_mb, "Largest safetensors shard, MiB")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->callback([opt]() {
    const ModelConfig c = model_preset(opt->preset);
    make_model(opt->dir, c, opt->seed, opt->shard_mb << 20, true);
    std::printf("wrote %s: %s, %d layers, hidden %d, %d Q / %d KV heads of %d, vocab %d\n",
                opt->dir.c_str(), c.architecture.c_str(), c.num_layers, c.hidden_size,
                c.num_q_heads, c.num_kv_heads, c.head_dim, c.vocab_size);
  });
}

}  // namespace fp8kv::cli
