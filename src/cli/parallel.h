// --tp for the model commands: run the command's body once per tensor-parallel rank.
#pragma once

#include <functional>
#include <string>

#include "fp8kv/observer.h"

namespace CLI {
class Option;
class App;
}  // namespace CLI

namespace fp8kv::cli {

// Adds `--tp N` (tensor-parallel ranks, default 1) to `cmd`.
void add_tp_option(CLI::App* cmd, int& tp);

// Runs body(comm) for every rank of `tp`: tp = 1 in this thread (a single-rank communicator);
// with --device cpu, tp ranks as threads of this process (the in-process communicator). With
// --device cuda and tp > 1: refused for now (one process per GPU over NCCL is not wired into
// the CLI yet). The body makes its own Device and loads its shard (Model::load(..., tp, rank));
// rank 0 prints and writes.
void run_tensor_parallel(int tp, const std::string& device,
                         const std::function<void(Communicator&)>& body);

}  // namespace fp8kv::cli
