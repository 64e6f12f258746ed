// The NCCL Communicator: one process per GPU. Only in CUDA builds (FP8KV_HAVE_CUDA).
#pragma once

#include <memory>
#include <string>

#include "fp8kv/communicator.h"
#include "fp8kv/export.h"

namespace fp8kv {

// Joins a group of `world` ranks: rank 0 creates the NCCL id and publishes it through the file
// `rendezvous` (written atomically), the others wait for it (up to `timeout_s` seconds). Binds
// this process to GPU `device`. Sets NCCL_NVLS_ENABLE=0 (no NVLink multicast) before NCCL starts.
FP8KV_API std::unique_ptr<Communicator> make_nccl_communicator(int rank, int world, int device,
                                                               const std::string& rendezvous,
                                                               double timeout_s = 120.0);

// The environment every rank process needs (NVLink multicast off in NCCL, PyTorch, NVSHMEM).
FP8KV_API void set_nccl_safety_env();

}  // namespace fp8kv
