// CPU-only builds (no nvcc): `fp8kv bench kernels` says that it needs CUDA.
#include "bench/bench_cases.h"
#include "bench/kernel_bench.h"
#include "fp8kv/error.h"

namespace fp8kv {

std::string run_kernel_bench(const KernelBenchOptions& o) {
  check_bench_options(o);  // a bad case name is the first thing said, as with CUDA
  throw Error(
      "fp8kv bench kernels needs a CUDA build (nvcc) and a Hopper GPU; this build has no CUDA "
      "backend");
}

}  // namespace fp8kv
