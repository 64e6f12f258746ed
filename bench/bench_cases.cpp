// The kernel benchmark's case tables (bench/bench_cases.h).
#include "bench/bench_cases.h"

#include <algorithm>
#include <string>

#include "fp8kv/error.h"
#include "fp8kv/kv_pool.h"

namespace fp8kv {

std::string DecodeCase::name() const {
  std::string n = "B" + std::to_string(B) + "_L" + std::to_string(L);
  if (D != 128) n += "_D" + std::to_string(D);
  if (Hq != 32 || Hkv != 8) n += "_Hq" + std::to_string(Hq) + "_Hkv" + std::to_string(Hkv);
  if (scattered) n += "_scattered";
  if (mixed) n += "_mixed";
  if (unordered) n += "_unordered";
  if (served == ServedPool::kTokenSlots) n += "_served_tokens";
  if (served == ServedPool::kSlotPages) n += "_served_pages";
  return n;
}

std::vector<int32_t> served_slot_table(int B, int L, ServedPool pool) {
  if (pool == ServedPool::kNo || L % SlotAllocator::kPageSlots != 0) {
    throw Error("served_slot_table: a served pool of L a multiple of 64, got L=" +
                std::to_string(L));
  }
  SlotAllocator alloc(static_cast<int64_t>(B) * L,
                      pool == ServedPool::kSlotPages ? SlotPolicy::kPages : SlotPolicy::kTokens);
  std::vector<int32_t> table(static_cast<size_t>(B) * L);
  auto grow = [&](int b, int from, int to) {
    int32_t* row = table.data() + static_cast<size_t>(b) * L;
    for (int pos = from; pos < to; ++pos) row[pos] = alloc.take(pos, pos > 0 ? row[pos - 1] : -1);
  };
  for (int b = 0; b < B; ++b) grow(b, 0, L / 4);
  for (int pos = L / 4; pos < L; ++pos) {
    for (int b = 0; b < B; ++b) grow(b, pos, pos + 1);
  }
  return table;
}

std::vector<DecodeCase> decode_cases(bool quick) {
  if (quick) return {{16, 2048, 32, 8, 128, false}, {2, 8192, 32, 8, 128, true}};
  // Last, a serving batch of mixed lengths (B=256, 1..2047 keys spread evenly, mean ~1024: the
  // bytes of B=256 L=1024), where the CTAs of requests of every length share the GPU; then the
  // same batch with its slots scattered, as a long-running server's batch is both; then the
  // mixed batch without the runner's longest-first order, as a caller that gives none decodes it
  // (FP8 at head_dim 128: the persistent kernel, which orders its own items; with the order,
  // one-item CTAs: docs/GPU.md, forty-sixth and forty-seventh sessions).
  // After the scattered rows, the reference shape on a served pool's slot table: LightLLM's token
  // allocator interleaves the requests decoded in steps, our pages keep every 64-key tile in
  // consecutive slots.
  return {{64, 4096, 32, 8, 128, false},
          {4, 32768, 32, 8, 128, false},
          {256, 1024, 32, 8, 128, false},
          {64, 4096, 32, 8, 64, false},
          {64, 4096, 32, 8, 256, false},
          {64, 4096, 28, 4, 128, false},
          {1, 131072, 32, 8, 128, false},
          {512, 512, 32, 8, 128, false},
          {64, 4096, 32, 8, 128, true},
          {256, 1024, 32, 8, 128, true},
          {64, 4096, 32, 8, 128, false, false, false, ServedPool::kTokenSlots},
          {64, 4096, 32, 8, 128, false, false, false, ServedPool::kSlotPages},
          {256, 1024, 32, 8, 128, false, false, false, ServedPool::kTokenSlots},
          {256, 1024, 32, 8, 128, false, false, false, ServedPool::kSlotPages},
          {32, 16384, 32, 8, 128, true},
          {32, 16384, 32, 8, 128, false, false, false, ServedPool::kTokenSlots},
          {32, 16384, 32, 8, 128, false, false, false, ServedPool::kSlotPages},
          {256, 2047, 32, 8, 128, false, true},
          {256, 2047, 32, 8, 128, true, true},
          {256, 2047, 32, 8, 128, false, true, true}};
}

std::vector<PrefillCase> prefill_cases(bool quick) {
  auto uniform = [](int B, int L) { return std::vector<int>(B, L); };
  std::vector<PrefillCase> cases;
  const int L0 = quick ? 2048 : 8192;
  cases.push_back({"B2_L" + std::to_string(L0), uniform(2, L0), uniform(2, L0), 32, 8, 128});
  cases.push_back({"B2_L" + std::to_string(L0) + "_noncausal", uniform(2, L0), uniform(2, L0), 32,
                   8, 128, /*causal=*/false});
  if (quick) return cases;
  for (int L : {1024, 4096, 16384, 32768}) {
    const int B = std::max(1, 16384 / L);
    cases.push_back({"B" + std::to_string(B) + "_L" + std::to_string(L), uniform(B, L),
                     uniform(B, L), 32, 8, 128});
  }
  cases.push_back({"B2_L8192_D64", uniform(2, 8192), uniform(2, 8192), 32, 8, 64});
  cases.push_back({"B2_L8192_D256", uniform(2, 8192), uniform(2, 8192), 32, 8, 256});
  cases.push_back({"B2_L8192_Hq28_Hkv4", uniform(2, 8192), uniform(2, 8192), 28, 4, 128});
  const std::vector<int> q = {2048, 100, 1500, 713, 1999, 333, 1024, 1801};  // new tokens
  std::vector<int> seq;
  for (int n : q) seq.push_back(1000 + n);
  cases.push_back({"prefix8_1000", seq, q, 32, 8, 128});
  return cases;
}

namespace {
// Refuses a case list (`flag`) with a name that is not in `names`.
void check_names(const char* flag, const std::string& list, const std::vector<std::string>& names) {
  if (list.empty()) return;
  std::string known;
  for (const std::string& n : names) known += (known.empty() ? "" : ", ") + n;
  for (const std::string& part : comma_list(list)) {
    if (std::find(names.begin(), names.end(), part) == names.end()) {
      throw Error(std::string("bench kernels ") + flag + ": no case '" + part + "' (" + known +
                  ")");
    }
  }
}
}  // namespace

void check_bench_options(const KernelBenchOptions& o) {
  const struct {
    const char* flag;
    int value, least;
  } counts[] = {{"--iters", o.iters, 1},
                {"--warmup", o.warmup, 0},
                {"--prefill-warmup", o.prefill_warmup, 0},
                {"--prefill-rest-ms", o.prefill_rest_ms, 0}};
  for (const auto& c : counts) {
    if (c.value < c.least) {
      throw Error(std::string("bench kernels ") + c.flag + ": " + std::to_string(c.value) +
                  " runs (at least " + std::to_string(c.least) + ")");
    }
  }
  std::vector<std::string> names;
  for (const DecodeCase& c : decode_cases(o.quick)) names.push_back(c.name());
  check_names("--decode-case", o.decode_cases, names);
  names.clear();
  for (const PrefillCase& c : prefill_cases(o.quick)) names.push_back(c.name);
  check_names("--prefill-case", o.prefill_cases, names);
}

}  // namespace fp8kv
