// CPU-only builds (no nvcc): the CUDA entry points exist and say that CUDA is not built in.
#ifndef FP8KV_HAVE_CUDA

#include <memory>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "fp8kv/model_ops.h"

namespace fp8kv {

std::unique_ptr<Backend> make_cuda_backend(int, void*) {
  throw Error(
      "the CUDA backend is not built in: rebuild with nvcc available (FP8KV_CUDA=AUTO or ON)");
}

std::unique_ptr<Backend> make_cuda_backend_own_stream(int) {
  throw Error(
      "the CUDA backend is not built in: rebuild with nvcc available (FP8KV_CUDA=AUTO or ON)");
}

bool cuda_available() { return false; }

std::unique_ptr<ModelOps> make_cuda_model_ops(Backend&, void*) {
  throw Error(
      "the CUDA model ops are not built in: rebuild with nvcc available (FP8KV_CUDA=AUTO or ON)");
}

}  // namespace fp8kv

#endif  // FP8KV_HAVE_CUDA
