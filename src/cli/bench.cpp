// fp8kv bench kernels: the kernel benchmark (bench/kernel_bench.h) on the GPU; prints a table
// of decode, prefill and quantize-on-write against ceilings measured in the same run. A build
// without CUDA says it needs one.
#include <CLI/CLI.hpp>

#include <memory>

#include "cli/commands.h"
#include "bench/kernel_bench.h"

namespace fp8kv::cli {

void add_bench(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Benchmarks");
  bench->require_subcommand(1);
  auto options = std::make_shared<KernelBenchOptions>();
  CLI::App* kernels = bench->add_subcommand("kernels",
                                            "Time decode / prefill / quantize-on-write kernels "
                                            "against measured ceilings (needs a CUDA build)");
  kernels->add_option("--device", options->device, "CUDA device")->capture_default_str();
  kernels->add_option("--iters", options->iters, "timed runs per measurement (median reported)")
      ->capture_default_str();
  kernels->add_option("--warmup", options->warmup, "untimed runs first")->capture_default_str();
  kernels
      ->add_option("--prefill-warmup", options->prefill_warmup,
                   "untimed rounds of a prefill case's kernels first (in turns; each round runs "
                   "every kernel once; the timed rounds are --iters / 2, at least 5)")
      ->capture_default_str();
  kernels
      ->add_option("--prefill-rest-ms", options->prefill_rest_ms,
                   "milliseconds the card idles before each scheme's kernels at the reference "
                   "prefill shape (the peer's first prefill row starts on a rested card); 0: none")
      ->capture_default_str();
  kernels->add_option("--json", options->json_path, "also write every number to this JSON file");
  kernels->add_flag("--quick", options->quick, "small shapes: a smoke test, not a measurement");
  kernels->add_flag("!--no-prefill", options->prefill, "skip the prefill rows");
  kernels->add_flag("!--no-gemm", options->gemm, "skip the cuBLASLt GEMM ceilings");
  kernels
      ->add_option(
          "--only", options->only,
          "run only these sections: a comma list of decode, prefill, quantize, linear, ring (ring: "
          "a bare bulk-copy ring, only when named)")
      ->check([](const std::string& v) {
        for (const std::string& part : comma_list(v)) {
          if (part != "decode" && part != "prefill" && part != "quantize" && part != "linear" &&
              part != "ring") {
            return "unknown section '" + part + "' (decode, prefill, quantize, linear, ring)";
          }
        }
        return std::string();
      });
  kernels->add_option("--decode-case", options->decode_cases,
                      "run only these decode cases: a comma list of their names (e.g. "
                      "B64_L4096,B256_L1024_scattered)");
  kernels->add_option(
      "--prefill-case", options->prefill_cases,
      "run only these prefill cases: a comma list of their names (e.g. B2_L8192,prefix8_1000)");
  kernels->callback([options] { run_kernel_bench(*options); });
  add_bench_model(*bench);
}

}  // namespace fp8kv::cli
