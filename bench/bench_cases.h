// The kernel benchmark's decode and prefill cases (`fp8kv bench kernels`), in plain C++: the
// benchmark runs them (bench/kernel_bench.cu), and both run_kernel_bench builds check
// --decode-case and --prefill-case against their names before anything touches a GPU (so a
// CPU-only build refuses a bad name as well).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "bench/kernel_bench.h"

namespace fp8kv {

// A served pool: the slot table a serving engine's allocator leaves after it prefilled a batch of
// B requests with L / 4 tokens each (in turn) and decoded the other 3L / 4 in steps of a token
// per request (served_slot_table), by LightLLM's token allocator or by our pages of 64 slots
// (SlotPolicy, fp8kv/kv_pool.h).
enum class ServedPool { kNo, kTokenSlots, kSlotPages };

// A decode row: B requests of L keys each (mixed: request b holds 1 + (b * 1021) % L), one new
// token each, Hq / Hkv heads of head_dim D, the slot table a random permutation of the pool
// (scattered), a served pool's, or each request's slots consecutive.
struct DecodeCase {
  int B, L, Hq, Hkv, D;
  bool scattered;
  bool mixed = false;
  // Without the runner's AttentionBatch::decode_order (every other row has it), as a caller that
  // gives none gets it.
  bool unordered = false;
  ServedPool served = ServedPool::kNo;
  // The record name: B64_L4096 for the reference shape, suffixes for the others (_D64,
  // _Hq28_Hkv4, _scattered, _mixed, _unordered, _served_tokens, _served_pages).
  std::string name() const;
};

// The served pool's slot table [B, L] (B * L slots; L a multiple of 64, so that the pages fit).
std::vector<int32_t> served_slot_table(int B, int L, ServedPool pool);

// A prefill row: request b holds seq[b] keys, the last q[b] of them new (a cached prefix
// before them).
struct PrefillCase {
  std::string name;
  std::vector<int> seq, q;
  int Hq, Hkv, D;
  bool causal = true;
};

std::vector<DecodeCase> decode_cases(bool quick);
std::vector<PrefillCase> prefill_cases(bool quick);

// Throws Error where a run count is out of range (--iters below 1, a negative warm-up), or
// o.decode_cases or o.prefill_cases names no case of its section (at o.quick), naming the option,
// the value and, for a case, the known ones.
void check_bench_options(const KernelBenchOptions& o);

}  // namespace fp8kv
