// Prefill attention dispatch: runtime scheme, head_dim and tile configuration -> a built kernel
// instance (prefill_instances.cuh). The kernel itself: prefill_kernel.cuh.
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
    case PrefillConfig::kWgmma: return "wgmma";
    case PrefillConfig::kWgmmaShort: return "wgmma-short";
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

template <KvScheme S, int D, int kBlockN, int kWarpgroups, int kMinBlocks>
bool try_launch_wgmma(const AttentionParams& p, cudaStream_t stream, DeviceError* error) {
  if constexpr (S == KvScheme::kFp8PerHead &&
                prefill::kWgmmaBuilt<D, kBlockN, kWarpgroups, kMinBlocks>) {
    prefill::launch_prefill_wgmma<D, kBlockN, kWarpgroups, kMinBlocks>(p, stream, error);
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
      config = PrefillConfig::kWgmma;
    } else {
      config = D == 256 ? PrefillConfig::kNarrow : PrefillConfig::kWide;
    }
  }
  constexpr int kLongN = D == 256 ? 64 : 128;
  bool launched = false;
  switch (config) {
    case PrefillConfig::kWide:
      launched = try_launch<S, D, 8, 64>(p, stream, error);
      break;
    case PrefillConfig::kNarrow:
      launched = D == 256 ? try_launch<S, D, 4, 32>(p, stream, error)
                          : try_launch<S, D, 4, 64>(p, stream, error);
      break;
    case PrefillConfig::kWgmma:
      launched = try_launch_wgmma<S, D, kLongN, 2, 1>(p, stream, error);
      break;
    case PrefillConfig::kWgmmaShort:
      launched = try_launch_wgmma<S, D, 64, 2, 1>(p, stream, error);
      break;
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
