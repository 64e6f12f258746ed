// The kernel benchmark behind `fp8kv bench kernels` and the fp8kv_bench binary
// (bench/kernel_bench.cu; the fp8kv_kernel_bench library, not libfp8kv). A CPU-only build
// throws Error saying it needs CUDA (bench/kernel_bench_stub.cpp).
#pragma once

#include <string>
#include <vector>

namespace fp8kv {

struct KernelBenchOptions {
  int device = 0;
  int warmup = 5;  // untimed runs before each measurement
  int iters = 20;  // timed runs; the median is reported
  // Untimed rounds of a prefill case's kernels before its timed rounds (each round runs every
  // kernel of the case once; the timed rounds are max(5, iters / 2)). Many rounds put the card at
  // its power limit before the timing (scripts/gpu-check sustained).
  int prefill_warmup = 1;
  // Milliseconds the card rests (idle) before each scheme's kernels at the reference prefill shape
  // (causal B=2 L=8192), so that they are timed as the PyTorch peer's first prefill row is: on a
  // card below its power limit, not right after the GEMM ceilings' seconds at full power or the
  // scheme before (docs/GPU.md, fifty-eighth session). 0: no rest (the sustained stage, whose
  // warm-up puts the card at its limit on purpose).
  int prefill_rest_ms = 2000;
  bool quick = false;   // smaller ceilings and shapes (a smoke test, not a measurement)
  bool prefill = true;  // include the prefill rows (PREFILL's kernel)
  bool gemm = true;     // measure the BF16/FP8 tensor-core ceilings through cuBLASLt
  std::string only;     // comma list of sections to run (decode, prefill, quantize, linear, ring);
                        // empty: all but ring (a diagnostic, bench/ring_bench.h)
  std::string json_path;  // when set, every number is written there as JSON
  std::string
      decode_cases;  // comma list of decode case names (e.g. B256_L1024_scattered); empty: all
  std::string prefill_cases;  // comma list of prefill case names (e.g. prefix8_1000); empty: all
};

// Runs the benchmark on the device, returns the table as printed text (also written to stdout
// as rows complete). A case name that is no case, or a run count out of range
// (check_bench_options), is refused first, before a GPU is looked for, in a CPU-only build too.
std::string run_kernel_bench(const KernelBenchOptions& options);

// The names of a comma list, as --only, --decode-case and --prefill-case take them ("a,b" -> {"a",
// "b"}).
inline std::vector<std::string> comma_list(const std::string& list) {
  std::vector<std::string> names;
  std::string rest = list + ",";
  for (size_t at = 0, next; (next = rest.find(',', at)) != std::string::npos; at = next + 1) {
    names.push_back(rest.substr(at, next - at));
  }
  return names;
}

}  // namespace fp8kv
