#include "cli/parallel.h"

#include <CLI/CLI.hpp>
#include <string>

#include "fp8kv/communicator.h"
#include "fp8kv/error.h"

namespace fp8kv::cli {

void add_tp_option(CLI::App* cmd, int& tp) {
  cmd->add_option("--tp", tp,
                  "Tensor-parallel ranks (Megatron-style head / intermediate split); with "
                  "--device cpu they run as threads of this process")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
}

void run_tensor_parallel(int tp, const std::string& device,
                         const std::function<void(Communicator&)>& body) {
  if (tp == 1) {
    auto single = make_single_communicator();
    body(*single);
    return;
  }
  if (device != "cpu") {
    throw Error("--tp " + std::to_string(tp) + " --device " + device +
                ": not yet; tensor parallelism runs on --device cpu only for now (ranks as "
                "threads). One process per GPU over NCCL is future work");
  }
  run_ranks(tp, body);
}

}  // namespace fp8kv::cli
