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

// Adds `--device auto|cpu|cuda` (default auto, or $FP8KV_DEVICE) and `--tp N` (tensor-parallel
// ranks, default 1) to `cmd`, and the hidden `--tp-rank R --tp-rendezvous FILE` that the parent
// of `--tp N --device cuda` gives each rank process.
void add_device_and_tp_options(CLI::App* cmd, std::string& device, int& tp);

// `--cuda-graph` / `--no-cuda-graph` (generate, bench model): decode steps recorded once per
// launch configuration and replayed as CUDA graphs (RunnerOptions::cuda_graph). Neither given:
// on for --device cuda at --tp 1 (the same bits as eager, fewer launch gaps), off elsewhere
// (the CPU backend cannot record; tensor-parallel ranks run eagerly). --cuda-graph asks for it
// anywhere (the runner refuses it on the CPU backend).
struct CudaGraphChoice {
  bool on = false;   // --cuda-graph
  bool off = false;  // --no-cuda-graph
};
void add_cuda_graph_options(CLI::App* cmd, CudaGraphChoice& choice, const std::string& help);
// `device`: the resolved one ("cpu" or "cuda"). Throws Error when both flags are given.
bool use_cuda_graph(const CudaGraphChoice& choice, const std::string& device, int tp);

// "auto" -> "cuda" when this build has the CUDA backend and `tp` GPUs of the architecture it was
// compiled for (Hopper) are there, else "cpu"; `why` gets the reason. Other names unchanged.
std::string resolve_device(const std::string& device, int tp, std::string* why);

// Runs body(comm) for every rank of `tp`: tp = 1 in this thread (a single-rank communicator);
// with --device cpu, tp ranks as threads of this process (the in-process communicator). With
// --device cuda and tp > 1, one process per GPU over NCCL: this process (the parent) checks that
// there are tp GPUs, starts tp copies of itself (same command line plus --tp-rank R
// --tp-rendezvous FILE; ranks > 0 write to a log file, so rank 0 alone prints), waits for them
// and throws Error naming the first rank that failed (stopping the others). A rank process
// joins the NCCL group on GPU R and runs body once. The body makes its own Device (on the
// current GPU) and loads its shard (Model::load(..., tp, rank)); rank 0 prints and writes.
// `device` "auto" is resolved first (resolve_device; the choice is said on stderr) and written
// back, so that the body's make_device(device) sees "cpu" or "cuda".
void run_tensor_parallel(int tp, std::string& device,
                         const std::function<void(Communicator&)>& body);

}  // namespace fp8kv::cli
