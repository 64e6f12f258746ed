// Deterministic random-weight models in the Hugging Face layout, so the demo and the tests need
// no downloads (`fp8kv make-model`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fp8kv/export.h"
#include "fp8kv/model_config.h"

namespace fp8kv {

// "tiny" (Llama, llama3 RoPE scaling, hidden 512, 4 layers, 8 Q / 2 KV heads of 64, vocab 2048),
// "tiny-mqa" (the same with a single KV head, so that any tp > 1 replicates it),
// "qwen2-tiny" (Qwen2: q/k/v biases, tied embeddings, 2 layers, 8 Q / 4 KV heads of 64),
// "llama-8b-4layers" (Llama 3.1 8B shapes, 4 layers: about 7.7 GB as fp32 in memory),
// "llama-3-8b" (the whole Llama 3.1 8B: 32 layers, hidden 4096, 32 Q / 8 KV heads of 128,
// intermediate 14336, vocab 128256, RoPE theta 500000, untied LM head: 16 GB of bf16),
// "qwen2.5-7b" (the whole Qwen2.5 7B: 28 layers, hidden 3584, 28 Q / 4 KV heads of 128,
// intermediate 18944, vocab 152064, q/k/v biases, untied LM head: 15 GB of bf16).
FP8KV_API std::vector<std::string> model_preset_names();
FP8KV_API ModelConfig model_preset(const std::string& name);  // throws Error listing the presets

// How make_model writes the shards: `threads` workers (0: the hardware's threads, at most 32),
// each filling and writing a piece of at most piece_bytes (a positive even number: whole bf16
// elements) of a tensor at a time. The bytes written depend on neither.
struct ModelWriter {
  int threads = 0;
  uint64_t piece_bytes = 64ull << 20;
};

// Writes DIR/config.json and bf16 safetensors weights (sharded with an index above
// `shard_bytes`, like real checkpoints), all shards at once by worker threads. Weights are
// uniform with std 1/sqrt(fan_in) (norms near 1), the same for the same config and seed on any
// machine, thread count and piece size. As in real models a few K channels carry outliers: in
// every layer some k_proj rows are scaled by 8-16x. Throws Error for a bad `writer`.
FP8KV_API void make_model(const std::string& dir, const ModelConfig& config, uint64_t seed = 0,
                          uint64_t shard_bytes = 5000ull << 20, bool show_progress = false,
                          const ModelWriter& writer = {});

}  // namespace fp8kv
