// fp8kv_bench: the kernel benchmark as its own binary (the same code as `fp8kv bench kernels`).
//   fp8kv_bench [--quick] [--iters N] [--warmup N] [--prefill-warmup N] [--prefill-rest-ms MS]
//               [--device N] [--json FILE]
//               [--no-prefill] [--no-gemm] [--only decode,prefill,quantize,linear,ring]
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fp8kv/error.h"
#include "bench/kernel_bench.h"

int main(int argc, char** argv) {
  fp8kv::KernelBenchOptions o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "fp8kv_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--quick")
      o.quick = true;
    else if (a == "--no-prefill")
      o.prefill = false;
    else if (a == "--no-gemm")
      o.gemm = false;
    else if (a == "--iters")
      o.iters = std::atoi(value());
    else if (a == "--warmup")
      o.warmup = std::atoi(value());
    else if (a == "--prefill-warmup")
      o.prefill_warmup = std::atoi(value());
    else if (a == "--prefill-rest-ms")
      o.prefill_rest_ms = std::atoi(value());
    else if (a == "--device")
      o.device = std::atoi(value());
    else if (a == "--json")
      o.json_path = value();
    else if (a == "--only")
      o.only = value();
    else {
      std::fprintf(stderr,
                   "usage: fp8kv_bench [--quick] [--iters N] [--warmup N] [--prefill-warmup N] "
                   "[--prefill-rest-ms MS] [--device N] [--json FILE] [--no-prefill] [--no-gemm] "
                   "[--only decode,prefill,quantize,linear,ring]\n");
      return 2;
    }
  }
  try {
    fp8kv::run_kernel_bench(o);
  } catch (const fp8kv::Error& e) {
    std::fprintf(stderr, "fp8kv_bench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
