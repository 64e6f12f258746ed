// Prefill attention dispatch: runtime scheme, head_dim and tile configuration -> a built kernel
// instance (the table: prefill_instances.cuh). The kernels: prefill_kernel.cuh (mma.sync) and
// prefill_ws.cuh (warp-specialized wgmma, fp8-per-head); their shared parts: prefill_common.cuh.
#include <string>

#include "fp8kv/error.h"
#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launchers.h"
#include "kernels/cuda/prefill_instances.cuh"
#include "kernels/cuda/prefill_launch.cuh"

namespace fp8kv::cuda {

const char* prefill_config_name(PrefillConfig config) {
  switch (config) {
    case PrefillConfig::kDefault: return "default";
    case PrefillConfig::kWide: return "wide";
    case PrefillConfig::kNarrow: return "narrow";
    case PrefillConfig::kWarpSpecialized: return "ws";
    case PrefillConfig::kWsPackGqa: return "ws-gqa";
    case PrefillConfig::kWsPackGqaPingPong: return "ws-gqa-pp";
    case PrefillConfig::kWsSwizzle: return "ws-sw128";
    case PrefillConfig::kWsDiagConsumers: return "ws-diag-consumers";
    case PrefillConfig::kWsDiagProducer: return "ws-diag-producer";
  }
  return "unknown";
}

namespace {

template <KvScheme S, int D, int kWarps, int kBlockN>
bool try_launch(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  if constexpr (prefill::kPrefillBuilt<S, D, kWarps, kBlockN>) {
    prefill::launch_prefill<S, D, kWarps, kBlockN>(p, stream, error);
    return true;
  } else {
    return false;
  }
}

// fp8-per-head on the warp-specialized kernel (prefill_ws.cuh); kDiag: benchmark diagnostics.
template <KvScheme S, int D, bool kPackGqa, bool kPingPong, bool kSwizzle = false, int kDiag = 0>
bool try_launch_ws(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  if constexpr (S == KvScheme::kFp8PerHead && prefill::kWsBuilt<D, kPackGqa, kPingPong, kSwizzle, kDiag>) {
    prefill::launch_prefill_ws<D, prefill::kWsBlockN<D>, prefill::kWsStages<D>, kPackGqa, kPingPong,
                               kSwizzle, kDiag>(p, stream, error);
    return true;
  } else {
    return false;
  }
}

template <KvScheme S, int D>
void launch_with_config(const AttentionParams& p, PrefillConfig config, cudaStream_t stream,
                        DeviceError* error) {
  if (config == PrefillConfig::kDefault) {
    if (S == KvScheme::kFp8PerHead) {
      // Measured on the H200: the swizzled layout 539 vs 483 TFLOP/s (causal B2 L8192 D128).
      config = D == 128 ? PrefillConfig::kWsSwizzle : PrefillConfig::kWarpSpecialized;
    } else {
      config = D == 256 ? PrefillConfig::kNarrow : PrefillConfig::kWide;
    }
  }
  bool launched = false;
  switch (config) {
    case PrefillConfig::kWide: launched = try_launch<S, D, 8, 64>(p, stream, error); break;
    case PrefillConfig::kNarrow:
      launched = D == 256 ? try_launch<S, D, 4, 32>(p, stream, error) : try_launch<S, D, 4, 64>(p, stream, error);
      break;
    case PrefillConfig::kWarpSpecialized: launched = try_launch_ws<S, D, false, false>(p, stream, error); break;
    case PrefillConfig::kWsPackGqa: launched = try_launch_ws<S, D, true, false>(p, stream, error); break;
    case PrefillConfig::kWsPackGqaPingPong: launched = try_launch_ws<S, D, true, true>(p, stream, error); break;
    case PrefillConfig::kWsSwizzle: launched = try_launch_ws<S, D, false, false, true>(p, stream, error); break;
    case PrefillConfig::kWsDiagConsumers: launched = try_launch_ws<S, D, false, false, false, 1>(p, stream, error); break;
    case PrefillConfig::kWsDiagProducer: launched = try_launch_ws<S, D, false, false, false, 2>(p, stream, error); break;
    default: break;
  }
  if (!launched) {
    throw Error(std::string("prefill_attention: tile config '") + prefill_config_name(config) +
                "' is not built for scheme " + scheme_name(S) + " and head_dim " + std::to_string(D));
  }
}

}  // namespace

void launch_prefill_attention(const AttentionParams& p, PrefillConfig config, cudaStream_t stream,
                              DeviceError* error) {
  FP8KV_DISPATCH_SCHEME(p.cache.scheme, kScheme, [&] {
    FP8KV_DISPATCH_HEAD_DIM(p.cache.head_dim, kHeadDim, [&] {
      if (p.batch.num_requests == 0 || p.batch.total_q == 0 || p.batch.max_q_len == 0) return;
      launch_with_config<kScheme, kHeadDim>(p, config, stream, error);
    });
  });
}

void launch_prefill_attention(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  launch_prefill_attention(p, PrefillConfig::kDefault, stream, error);
}

}  // namespace fp8kv::cuda
