// The kernel benchmark (`fp8kv bench kernels`, `fp8kv_bench`; not part of libfp8kv): ceilings
// measured in the same run (streaming read and device copy bandwidth, BF16/FP8 tensor-core rate
// through cuBLASLt), then decode attention, prefill attention and quantize-on-write against them.
// Times are CUDA-event medians after warm-up; every input is random (never zeros) and larger than
// L2 so each run reads device memory. Launches go straight to the launchers (no validation, no host
// sync).
#include <cublasLt.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/model_ops.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/decode.cuh"
#include "kernels/cuda/launchers.h"
#include "kernels/cuda/prefill_launch.cuh"
#include "kernels/decode_split.h"
#include "bench/bench_cases.h"
#include "bench/kernel_bench.h"
#include "bench/ring_bench.h"

namespace fp8kv {
namespace {

using cuda::check_cuda;

// ---- device helpers ---------------------------------------------------------------------

__device__ __forceinline__ uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
// Uniform in [-1, 1).
__device__ __forceinline__ float rand_pm1(uint64_t seed, uint64_t i) {
  return static_cast<float>(mix(seed * 0x100000001b3ull + i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

__global__ void fill_bf16_kernel(uint16_t* p, size_t n, uint64_t seed, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = cuda::float_to_bf16_bits(rand_pm1(seed, i) * amp);
  }
}
__global__ void fill_e4m3_kernel(uint8_t* p, size_t n, uint64_t seed, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = cuda::float_to_e4m3_hw(rand_pm1(seed, i) * amp);
  }
}
__global__ void fill_e5m2_kernel(uint8_t* p, size_t n, uint64_t seed, float amp) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    p[i] = static_cast<uint8_t>(cuda::float2_to_e5m2x2_hw(rand_pm1(seed, i) * amp, 0.0f));
  }
}

// Streaming read: 4 independent 16-byte loads in flight per thread per iteration; the XOR is
// written only when it hits an impossible value, so the loads cannot be optimized away.
__global__ void read_bw_kernel(const uint4* __restrict__ p, size_t n, uint4* sink) {
  uint32_t acc = 0;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = cuda::ld_stream_v4(p + i), b = cuda::ld_stream_v4(p + i + stride);
    const uint4 c = cuda::ld_stream_v4(p + i + 2 * stride),
                d = cuda::ld_stream_v4(p + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^
           d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = cuda::ld_stream_v4(p + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = make_uint4(acc, 0, 0, 0);
}

// A slot table's peer read: the pool's rows through `slots` in pieces of `piece` bytes (the decode
// kernel's copy: its KV heads' K or V row of one token; 128, 256 or 512), one piece group after
// the other and the table's slots in turn within it, as the decode CTAs take them. A piece is
// piece / 16 adjacent lanes' 16-byte loads; four pieces a lane group in flight (their slots
// loaded first); no compute. What the DRAM gives a gather of such pieces.
__global__ void gather_read_kernel(const uint8_t* __restrict__ pool,
                                   const int32_t* __restrict__ slots, int n_slots, int row_bytes,
                                   int piece, uint4* sink) {
  const int lanes = piece / 16;  // a piece's lanes: 8, 16 or 32
  const int lane = threadIdx.x % lanes;
  const int team = (blockIdx.x * blockDim.x + threadIdx.x) / lanes;  // this piece's lane group
  const int teams = gridDim.x * blockDim.x / lanes;
  uint32_t acc = 0;
  for (int g = 0; g < row_bytes / piece; ++g) {
    const uint8_t* base = pool + static_cast<int64_t>(g) * piece + lane * 16;
    int j = team;
    for (; j + 3 * teams < n_slots; j += 4 * teams) {
      const int64_t s0 = slots[j], s1 = slots[j + teams], s2 = slots[j + 2 * teams],
                    s3 = slots[j + 3 * teams];
      const uint4 a = cuda::ld_stream_v4(reinterpret_cast<const uint4*>(base + s0 * row_bytes));
      const uint4 b = cuda::ld_stream_v4(reinterpret_cast<const uint4*>(base + s1 * row_bytes));
      const uint4 c = cuda::ld_stream_v4(reinterpret_cast<const uint4*>(base + s2 * row_bytes));
      const uint4 d = cuda::ld_stream_v4(reinterpret_cast<const uint4*>(base + s3 * row_bytes));
      acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
             d.z ^ d.w;
    }
    for (; j < n_slots; j += teams) {
      const uint4 a = cuda::ld_stream_v4(
          reinterpret_cast<const uint4*>(base + static_cast<int64_t>(slots[j]) * row_bytes));
      acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = make_uint4(acc, 0, 0, 0);
}

// ---- host helpers -----------------------------------------------------------------------

// The benchmark's device memory: BackendBuffers of the CUDA backend run_kernel_bench makes.
Backend* g_device = nullptr;
Backend& device() { return *g_device; }

void fill_bf16(void* p, size_t n, uint64_t seed, float amp, cudaStream_t s) {
  fill_bf16_kernel<<<1024, 256, 0, s>>>(static_cast<uint16_t*>(p), n, seed, amp);
  check_cuda(cudaGetLastError(), "fill_bf16");
}
void fill_e4m3(void* p, size_t n, uint64_t seed, float amp, cudaStream_t s) {
  fill_e4m3_kernel<<<1024, 256, 0, s>>>(static_cast<uint8_t*>(p), n, seed, amp);
  check_cuda(cudaGetLastError(), "fill_e4m3");
}
void fill_e5m2(void* p, size_t n, uint64_t seed, float amp, cudaStream_t s) {
  fill_e5m2_kernel<<<1024, 256, 0, s>>>(static_cast<uint8_t*>(p), n, seed, amp);
  check_cuda(cudaGetLastError(), "fill_e5m2");
}
// On the benchmark's stream, through the backend (cudaMemcpyAsync), so that the kernels queued
// after it read the data. (A plain cudaMemcpy goes to the legacy default stream, which does not
// order with the non-blocking bench stream, and from pageable memory it returns once the data is
// staged, before it lands: a kernel could then read a fresh allocation's stale contents — the
// likely cause of the intermittent illegal address at prefix8_1000's first launch.)
template <typename T>
T* upload(BackendBuffer& b, const std::vector<T>& v) {
  device().upload(b.get(), v.data(), v.size() * sizeof(T));
  return b.as<T>();
}

// Whether an option's comma list selects `name`: an empty list selects everything.
bool selects(const std::string& list, const std::string& name) {
  if (list.empty()) return true;
  const std::vector<std::string> names = comma_list(list);
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Median time in µs of each of `runs`, timed in turns (each run once, then each again, `iters`
// times) after `warmup` runs of each, so that every one sees the same mix of clocks. Timed one
// after the other, the first ran on a rested card: the same non-causal prefill kernel read 640
// TFLOP/s as the first config of a row and 611 two long configs later (H200).
// With `settle`, each timed run follows an untimed run of itself, so that it starts from the
// state it leaves (its own share of dirty lines in L2) rather than from the previous run's: a
// kernel that writes is otherwise charged with the write-back of whatever wrote before it.
std::vector<double> time_us_in_turns(const std::vector<std::function<void()>>& runs, int warmup,
                                     int iters, cudaStream_t s, bool settle = false) {
  for (const auto& run : runs) {
    for (int i = 0; i < warmup; ++i) run();
  }
  const size_t n = runs.size();
  std::vector<cudaEvent_t> ev(2 * n * static_cast<size_t>(iters));
  for (auto& e : ev) check_cuda(cudaEventCreate(&e), "cudaEventCreate");
  for (int i = 0; i < iters; ++i) {
    for (size_t k = 0; k < n; ++k) {
      const size_t at = 2 * (static_cast<size_t>(i) * n + k);
      if (settle) runs[k]();
      check_cuda(cudaEventRecord(ev[at], s), "cudaEventRecord");
      runs[k]();
      check_cuda(cudaEventRecord(ev[at + 1], s), "cudaEventRecord");
    }
  }
  check_cuda(cudaStreamSynchronize(s), "bench synchronize");
  std::vector<double> median(n);
  for (size_t k = 0; k < n; ++k) {
    std::vector<double> t(iters);
    for (int i = 0; i < iters; ++i) {
      const size_t at = 2 * (static_cast<size_t>(i) * n + k);
      float ms = 0;
      check_cuda(cudaEventElapsedTime(&ms, ev[at], ev[at + 1]), "cudaEventElapsedTime");
      t[i] = ms * 1e3;
    }
    std::sort(t.begin(), t.end());
    median[k] = t[iters / 2];
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return median;
}

// Median time in microseconds of `iters` runs after `warmup` runs, one event pair per run.
double time_us(const std::function<void()>& run, int warmup, int iters, cudaStream_t s) {
  return time_us_in_turns({run}, warmup, iters, s)[0];
}

#if defined(FP8KV_DECODE_TIMELINE) || defined(FP8KV_PREFILL_TIMELINE)
// One more launch (`run`) with a zeroed device buffer of n stamps handed to the kernels by
// `set` (set_decode_timeline, set_prefill_timeline) and taken back after; the stamps, on the host.
template <typename T>
std::vector<T> capture_timeline(size_t n, void (*set)(T*), const std::function<void()>& run) {
  T* d = nullptr;
  check_cuda(cudaMalloc(&d, n * sizeof(T)), "timeline buffer");
  check_cuda(cudaMemset(d, 0, n * sizeof(T)), "timeline memset");
  check_cuda(cudaDeviceSynchronize(), "timeline memset");  // the legacy stream: done before run()
  set(d);
  run();
  set(nullptr);
  check_cuda(cudaDeviceSynchronize(), "timeline launch");  // the launch ran on the bench's stream
  std::vector<T> h(n);
  check_cuda(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost), "timeline copy");
  check_cuda(cudaFree(d), "timeline free");
  return h;
}
#endif

#ifdef FP8KV_PREFILL_TIMELINE
// Diagnostic build: one more launch of a prefill row with the warp-specialized kernel's
// per-tile stamps of CTA (0, 0, 0) (prefill_launch.cuh), summarized as medians over its middle
// tiles (the first and last two left out), in SM cycles: per consumer warpgroup the wait for the
// tile, the issue of QK(j) with PV(j-1) (with the ping-pong turn), until S(j) landed, the softmax,
// until PV(j-1) landed, the promotion and P's packing, and the period; for the producer the wait
// for a free stage, the load latency (issued -> landed), its named barrier, the transform (V^T or
// widening), and the period; then how far warpgroup 1 runs behind warpgroup 0 and how long after
// its publication each warpgroup takes a tile (small: it waited for the producer). The stamps
// cost the kernel registers (a few spills): compare phases, not this launch's speed.
void print_prefill_timeline(const std::function<void()>& run, const std::string& what) {
  constexpr int kT = cuda::kPrefillTimelineTiles, kE = cuda::kPrefillTimelineEvents;
  const std::vector<uint32_t> h = capture_timeline<uint32_t>(
      static_cast<size_t>(cuda::kPrefillTimelineRoles) * kT * kE, cuda::set_prefill_timeline, run);
  auto at = [&](int role, int tile, int event) {
    return h[(static_cast<size_t>(role) * kT + tile) * kE + event];
  };
  int tiles = 0;  // the consumers stamp kTlTop in every tile they compute
  while (tiles < kT && (at(1, tiles, cuda::kTlTop) != 0 || at(2, tiles, cuda::kTlTop) != 0))
    ++tiles;
  if (tiles < 6) {
    std::printf("  timeline %s: %d tiles stamped, too few to summarize\n", what.c_str(), tiles);
    return;
  }
  // Median over tiles 2 .. tiles - 3 of a difference of two 32-bit cycle counts (wrapping; a
  // negative difference comes back negative).
  auto median = [&](int role0, int event0, int role1, int event1, int tile_step) {
    std::vector<int64_t> v;
    for (int j = 2; j < tiles - 2; ++j) {
      v.push_back(static_cast<int32_t>(at(role1, j + tile_step, event1) - at(role0, j, event0)));
    }
    std::sort(v.begin(), v.end());
    return static_cast<long long>(v[v.size() / 2]);
  };
  auto phase = [&](int role, int event0, int event1) {
    return median(role, event0, role, event1, 0);
  };
  auto period = [&](int role) { return median(role, cuda::kTlTop, role, cuda::kTlTop, 1); };
  std::printf("  timeline %s: CTA (0, 0, 0), %d key tiles, SM cycles, median over tiles 2..%d\n",
              what.c_str(), tiles, tiles - 3);
  for (int role = 1; role <= 2; ++role) {
    std::printf(
        "    consumer %d: period %lld | wait full %lld, issue %lld, until S %lld, softmax %lld,"
        " until PV %lld, promote+pack %lld\n",
        role - 1, period(role), phase(role, cuda::kTlTop, cuda::kTlFull),
        phase(role, cuda::kTlFull, cuda::kTlIssued), phase(role, cuda::kTlIssued, cuda::kTlScores),
        phase(role, cuda::kTlScores, cuda::kTlSoftmax), phase(role, cuda::kTlSoftmax, cuda::kTlPv),
        phase(role, cuda::kTlPv, cuda::kTlPacked));
  }
  std::printf(
      "    producer: period %lld | wait for a stage %lld, loads issued -> landed %lld, barrier "
      "%lld,"
      " transform %lld\n",
      period(0), phase(0, cuda::kTlEmptyWait, cuda::kTlEmptyDone),
      phase(0, cuda::kTlIssued, cuda::kTlLanded), phase(0, cuda::kTlLanded, cuda::kTlBarrier),
      phase(0, cuda::kTlBarrier, cuda::kTlTransformed));
  std::printf(
      "    consumer 1 behind consumer 0 by %lld | a tile taken after its publication: consumer 0 "
      "%lld,"
      " consumer 1 %lld\n",
      median(1, cuda::kTlTop, 2, cuda::kTlTop, 0),
      median(0, cuda::kTlPublished, 1, cuda::kTlFull, 0),
      median(0, cuda::kTlPublished, 2, cuda::kTlFull, 0));
}
#endif

#ifdef FP8KV_DECODE_TIMELINE
// Quantile f of a sorted vector (0 for an empty one).
double quantile(const std::vector<double>& v, double f) {
  return v.empty() ? 0.0 : v[std::min(v.size() - 1, static_cast<size_t>(f * v.size()))];
}

// The persistent kernel's entries (decode.cuh: type 1 per item, type 2 per CTA), in µs: the CTAs'
// start, ramp (start -> first stage landed) and end; per item its stream (first stage -> last tile
// computed) and epilogue (-> output written); per CTA the gaps between its items (an item's output
// written -> the next item's first stage landed: the ring's streaming across items) and its busy
// share (items' first stage -> output written, over its first stage -> last output).
void print_persistent_timeline(const std::vector<uint64_t>& h, size_t entries,
                               const std::string& what, double event_us, double ideal_us) {
  constexpr int kF = cuda::kDecodeTimelineFields;
  struct Item {
    uint64_t first, streamed, done;
  };
  std::map<uint64_t, std::vector<Item>> by_cta;
  std::vector<double> start, ramp, end, stream, epilogue;
  uint64_t t0 = ~uint64_t{0}, t1 = 0;
  for (size_t i = 0; i < entries; ++i) {
    const uint64_t* e = &h[kF * i];
    if (e[0] == 0 || (e[4] >> 32) != 2) continue;
    t0 = std::min(t0, e[0]);
    t1 = std::max(t1, e[3]);
  }
  if (t1 == 0) return;
  for (size_t i = 0; i < entries; ++i) {
    const uint64_t* e = &h[kF * i];
    if (e[0] == 0) continue;
    if ((e[4] >> 32) == 2) {
      start.push_back((e[0] - t0) * 1e-3);
      if (e[1] != 0) ramp.push_back((e[1] - e[0]) * 1e-3);
      end.push_back((e[3] - t0) * 1e-3);
    } else if ((e[4] >> 32) == 1) {
      by_cta[e[3]].push_back({e[0], e[1], e[2]});
      stream.push_back((e[1] - e[0]) * 1e-3);
      epilogue.push_back((e[2] - e[1]) * 1e-3);
    }
  }
  std::vector<double> gap, gap_sum, busy, per_cta;
  for (auto& [cta, items] : by_cta) {
    std::sort(items.begin(), items.end(),
              [](const Item& x, const Item& y) { return x.first < y.first; });
    double sum = 0.0, work = 0.0;
    for (size_t k = 0; k < items.size(); ++k) {
      work += (items[k].done - items[k].first) * 1e-3;
      if (k > 0) {
        const double g =
            (static_cast<double>(items[k].first) - static_cast<double>(items[k - 1].done)) * 1e-3;
        gap.push_back(g);
        sum += g;
      }
    }
    gap_sum.push_back(sum);
    const double span = (items.back().done - items.front().first) * 1e-3;
    if (span > 0.0) busy.push_back(work / span);
    per_cta.push_back(static_cast<double>(items.size()));
  }
  for (auto* v : {&start, &ramp, &end, &stream, &epilogue, &gap, &gap_sum, &busy, &per_cta})
    std::sort(v->begin(), v->end());
  const auto q = quantile;
  std::printf(
      "  timeline %s (persistent): %zu CTAs, %zu items (%.0f..%.0f a CTA), event %.1f us, ideal "
      "%.1f, span %.1f"
      " | start p50 %.2f max %.2f | ramp p50 %.2f max %.2f | end p10 %.1f p50 %.1f max %.1f | item "
      "stream"
      " p50 %.2f max %.2f | epilogue p50 %.2f max %.2f | gap p50 %.2f p90 %.2f max %.2f, a CTA's "
      "sum p50 %.1f"
      " max %.1f | busy p10 %.3f p50 %.3f\n",
      what.c_str(), start.size(), stream.size(), q(per_cta, 0.0), q(per_cta, 1.0), event_us,
      ideal_us, (t1 - t0) * 1e-3, q(start, 0.5), q(start, 1.0), q(ramp, 0.5), q(ramp, 1.0),
      q(end, 0.1), q(end, 0.5), q(end, 1.0), q(stream, 0.5), q(stream, 1.0), q(epilogue, 0.5),
      q(epilogue, 1.0), q(gap, 0.5), q(gap, 0.9), q(gap, 1.0), q(gap_sum, 0.5), q(gap_sum, 1.0),
      q(busy, 0.1), q(busy, 0.5));
}

// Diagnostic build: one more launch of a decode row with per-CTA timestamps, summarized as
// quantiles (µs): when CTAs start (from the first), their ramp (start -> first tile landed), their
// stream (first tile -> last tile computed), their epilogue, and when they end. The span is the
// first start to the last end; the event time and the ideal (cache bytes / read ceiling) beside
// it. A persistent launch's entries go to print_persistent_timeline.
void print_decode_timeline(const std::function<void()>& run, const std::string& what,
                           double event_us, double ideal_us) {
  constexpr size_t kMaxCtas = size_t{1} << 16;
  constexpr int kF = cuda::kDecodeTimelineFields;
  const std::vector<uint64_t> h =
      capture_timeline<uint64_t>(kF * kMaxCtas, cuda::set_decode_timeline, run);
  for (size_t i = 0; i < kMaxCtas; ++i) {
    if (h[kF * i] != 0 && (h[kF * i + 4] >> 32) != 0) {  // the persistent kernel's entries
      print_persistent_timeline(h, kMaxCtas, what, event_us, ideal_us);
      return;
    }
  }
  uint64_t t0 = ~uint64_t{0}, t1 = 0;
  for (size_t i = 0; i < kMaxCtas; ++i) {
    if (h[kF * i] == 0) continue;  // no such CTA
    t0 = std::min(t0, h[kF * i]);
    t1 = std::max(t1, h[kF * i + 3]);
  }
  // The quantiles below, and per SM the mean stream time of its CTAs (slow SMs, a placement
  // effect, vs slow CTAs).
  std::vector<double> start, ramp, prologue, landing, stream, epilogue, end;
  std::vector<double> to_row, to_bar, to_issue0;  // the one-item prologue's steps
  std::vector<double> sm_sum(1024, 0.0);
  std::vector<int> sm_n(1024, 0);
  for (size_t i = 0; i < kMaxCtas; ++i) {
    const uint64_t* e = &h[kF * i];
    if (e[0] == 0) continue;
    start.push_back((e[0] - t0) * 1e-3);
    if (e[1] != 0) {  // a CTA with tiles
      ramp.push_back((e[1] - e[0]) * 1e-3);
      if (e[5] >= e[0] && e[5] <= e[1]) {  // the ramp in two: to the prologue's copies, then on
        prologue.push_back((e[5] - e[0]) * 1e-3);
        landing.push_back((e[1] - e[5]) * 1e-3);
      }
      if (e[6] >= e[0] && e[7] >= e[6] && e[8] >= e[7] && e[5] >= e[8]) {  // the prologue's steps
        to_row.push_back((e[6] - e[0]) * 1e-3);
        to_bar.push_back((e[7] - e[6]) * 1e-3);
        to_issue0.push_back((e[8] - e[7]) * 1e-3);
      }
      stream.push_back((e[2] - e[1]) * 1e-3);
      if (e[4] < sm_sum.size()) {
        sm_sum[e[4]] += stream.back();
        ++sm_n[e[4]];
      }
    }
    epilogue.push_back((e[3] - e[2]) * 1e-3);
    end.push_back((e[3] - t0) * 1e-3);
  }
  if (start.empty()) return;
  for (auto* v : {&start, &ramp, &prologue, &landing, &stream, &epilogue, &end, &to_row, &to_bar,
                  &to_issue0}) {
    std::sort(v->begin(), v->end());
  }
  const auto q = quantile;
  std::vector<std::pair<double, int>> sm_mean;
  for (size_t i = 0; i < sm_sum.size(); ++i) {
    if (sm_n[i] > 0) sm_mean.emplace_back(sm_sum[i] / sm_n[i], static_cast<int>(i));
  }
  std::sort(sm_mean.begin(), sm_mean.end());
  std::printf(
      "  timeline %s: %zu CTAs, event %.1f us, ideal %.1f, span %.1f | start p50 %.1f p90 %.1f max "
      "%.1f"
      " | ramp p10 %.2f p50 %.2f p90 %.2f (prologue p50 %.2f, copies issued to landed p50 %.2f)"
      " | stream p10 %.1f p50 %.1f max %.1f | epilogue p50 %.2f"
      " max %.2f | end p10 %.1f p50 %.1f p90 %.1f max %.1f\n",
      what.c_str(), start.size(), event_us, ideal_us, (t1 - t0) * 1e-3, q(start, 0.5),
      q(start, 0.9), q(start, 1.0), q(ramp, 0.1), q(ramp, 0.5), q(ramp, 0.9), q(prologue, 0.5),
      q(landing, 0.5), q(stream, 0.1), q(stream, 0.5), q(stream, 1.0), q(epilogue, 0.5),
      q(epilogue, 1.0), q(end, 0.1), q(end, 0.5), q(end, 0.9), q(end, 1.0));
  if (!sm_mean.empty()) {
    std::printf(
        "    per SM (mean stream of its CTAs): %zu SMs, fastest %.1f, median %.1f, slowest %.1f; "
        "slowest 12:",
        sm_mean.size(), sm_mean.front().first, sm_mean[sm_mean.size() / 2].first,
        sm_mean.back().first);
    for (size_t i = sm_mean.size() > 12 ? sm_mean.size() - 12 : 0; i < sm_mean.size(); ++i)
      std::printf(" %d(%.1f)", sm_mean[i].second, sm_mean[i].first);
    std::printf("; fastest 12:");
    for (size_t i = 0; i < std::min<size_t>(12, sm_mean.size()); ++i)
      std::printf(" %d(%.1f)", sm_mean[i].second, sm_mean[i].first);
    std::printf("\n");
  }
  if (!to_row.empty()) {
    std::printf(
        "    prologue steps p50 / p90: the request's row known %.2f / %.2f, barriers set up"
        " %.2f / %.2f, first copy issued %.2f / %.2f\n",
        q(to_row, 0.5), q(to_row, 0.9), q(to_bar, 0.5), q(to_bar, 0.9), q(to_issue0, 0.5),
        q(to_issue0, 0.9));
  }
}
#endif

class Report {
 public:
  void line(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    text_ += buf;
    text_ += '\n';
    std::printf("%s\n", buf);
    std::fflush(stdout);
  }
  // JSON: one object per measurement.
  void record(const std::string& kind, const std::string& name,
              std::vector<std::pair<std::string, double>> values) {
    std::string o = "{\"kind\":\"" + kind + "\",\"name\":\"" + name + "\"";
    for (auto& [k, v] : values) {
      char buf[64];
      std::snprintf(buf, sizeof buf, ",\"%s\":%.6g", k.c_str(), std::isfinite(v) ? v : -1.0);
      o += buf;
    }
    json_.push_back(o + "}");
  }
  const std::string& text() const { return text_; }
  // The records so far; `complete` false until the last section is done. Written after every
  // section (to a temporary, then renamed), so that a run that dies in a later section (a sticky
  // CUDA error ends the process) still leaves the finished sections for the report.
  void write_json(const std::string& path, const std::string& device, bool complete) const {
    const std::string tmp = path + ".tmp";
    FILE* f = std::fopen(tmp.c_str(), "w");
    if (!f) throw Error("bench: cannot write " + tmp);
    std::fprintf(f, "{\"device\":\"%s\",\"complete\":%s,\"results\":[\n", device.c_str(),
                 complete ? "true" : "false");
    for (size_t i = 0; i < json_.size(); ++i)
      std::fprintf(f, "  %s%s\n", json_[i].c_str(), i + 1 < json_.size() ? "," : "");
    std::fprintf(f, "]}\n");
    const bool ok = std::fflush(f) == 0 && !std::ferror(f);
    std::fclose(f);
    if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
      std::remove(tmp.c_str());
      throw Error("bench: cannot write " + path);
    }
  }

 private:
  std::string text_;
  std::vector<std::string> json_;
};

// ---- ceilings ---------------------------------------------------------------------------

double measure_read_gbs(size_t bytes, const KernelBenchOptions& o, cudaStream_t s) {
  BackendBuffer buf(device(), bytes), sink(device(), 64);
  fill_e4m3(buf.get(), bytes, 7, 1.0f, s);
  const size_t n = bytes / 16;
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attr");
  const double us =
      time_us([&] { read_bw_kernel<<<sms * 8, 256, 0, s>>>(buf.as<uint4>(), n, sink.as<uint4>()); },
              o.warmup, o.iters, s);
  return bytes / us * 1e-3;
}

double measure_copy_gbs(size_t bytes, const KernelBenchOptions& o, cudaStream_t s) {
  BackendBuffer a(device(), bytes), b(device(), bytes);
  fill_e4m3(a.get(), bytes, 8, 1.0f, s);
  const double us = time_us(
      [&] {
        check_cuda(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, s), "copy");
      },
      o.warmup, o.iters, s);
  return 2.0 * bytes / us * 1e-3;  // read + write
}

// C[m,n] = A^T B in cuBLASLt's column-major terms (TN: the layout FP8 requires), 8192^3.
double measure_gemm_tflops(bool fp8, int n, const KernelBenchOptions& o, cudaStream_t s) {
  cublasLtHandle_t lt;
  if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) throw Error("cublasLtCreate failed");
  const size_t elems = static_cast<size_t>(n) * n;
  const size_t in_bytes = elems * (fp8 ? 1 : 2);
  BackendBuffer A(device(), in_bytes), B(device(), in_bytes), D(device(), elems * 2),
      ws(device(), 64u << 20);
  if (fp8) {
    fill_e4m3(A.get(), elems, 11, 4.0f, s);
    fill_e4m3(B.get(), elems, 12, 4.0f, s);
  } else {
    fill_bf16(A.get(), elems, 11, 1.0f, s);
    fill_bf16(B.get(), elems, 12, 1.0f, s);
  }
  const cudaDataType_t in_t = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc;
  auto ok = [](cublasStatus_t st, const char* what) {
    if (st != CUBLAS_STATUS_SUCCESS)
      throw Error(std::string("cuBLASLt ") + what + " failed: " + std::to_string(st));
  };
  ok(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc");
  const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
  ok(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA), "transa");
  ok(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB), "transb");
  ok(cublasLtMatrixLayoutCreate(&la, in_t, n, n, n), "layout A");
  ok(cublasLtMatrixLayoutCreate(&lb, in_t, n, n, n), "layout B");
  ok(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, n, n), "layout C");
  cublasLtMatmulPreference_t pref;
  ok(cublasLtMatmulPreferenceCreate(&pref), "pref");
  const size_t ws_bytes = ws.bytes();
  ok(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                          sizeof ws_bytes),
     "pref ws");
  cublasLtMatmulHeuristicResult_t heur{};
  int found = 0;
  ok(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 1, &heur, &found), "heuristic");
  if (found == 0) throw Error("cuBLASLt: no algorithm");
  const float alpha = 1.0f, beta = 0.0f;
  const double us = time_us(
      [&] {
        ok(cublasLtMatmul(lt, desc, &alpha, A.get(), la, B.get(), lb, &beta, D.get(), lc, D.get(),
                          lc, &heur.algo, ws.get(), ws_bytes, s),
           "matmul");
      },
      o.warmup, o.iters, s);
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  cublasLtDestroy(lt);
  return 2.0 * n * static_cast<double>(n) * n / us * 1e-6;
}

// ---- attention problems -----------------------------------------------------------------

// Every scheme: bf16, fp8-per-tensor, fp8-per-head, fp8-e5m2, fp8-per-head-bf16q.
const auto& kSchemes = kAllSchemes;

// A batch of B requests of L tokens each (all cached but the q_len newest), slots a random
// permutation of the pool (scattered rows, as a long-running server's pool looks).
struct BenchBatch {
  int B, L, q_len, Hq, Hkv, D;
  std::unique_ptr<BackendBuffer> seq, cu, ri, rt, q, q8, qs, o, ks, vs;
  AttentionBatch batch;

  BenchBatch(int B_, int L_, int q_len_, int Hq_, int Hkv_, int D_, cudaStream_t s,
             bool scattered = true)
      : BenchBatch(std::vector<int>(B_, L_), std::vector<int>(B_, q_len_), Hq_, Hkv_, D_, s,
                   scattered) {}
  // Requests of their own lengths: request b holds seq_lens[b] tokens, the last q_lens[b] of them
  // new (a cached prefix before them).
  // `table`: the slot table ([B, max seq_lens]) instead of a permutation or consecutive slots.
  BenchBatch(const std::vector<int>& seq_lens, const std::vector<int>& q_lens, int Hq_, int Hkv_,
             int D_, cudaStream_t s, bool scattered = true,
             const std::vector<int32_t>* table = nullptr)
      : B(static_cast<int>(seq_lens.size())),
        L(*std::max_element(seq_lens.begin(), seq_lens.end())),
        q_len(*std::max_element(q_lens.begin(), q_lens.end())),
        Hq(Hq_),
        Hkv(Hkv_),
        D(D_) {
    std::vector<int32_t> seq_v(seq_lens.begin(), seq_lens.end()), cu_v(B + 1), ri_v(B),
        rt_v(static_cast<size_t>(B) * L);
    for (int b = 0; b < B; ++b) cu_v[b + 1] = cu_v[b] + q_lens[b];
    std::iota(ri_v.begin(), ri_v.end(), 0);
    std::iota(rt_v.begin(), rt_v.end(), 0);
    if (scattered) std::shuffle(rt_v.begin(), rt_v.end(), std::mt19937(1234));
    if (table != nullptr) rt_v = *table;
    seq = std::make_unique<BackendBuffer>(device(), B * 4);
    cu = std::make_unique<BackendBuffer>(device(), (B + 1) * 4);
    ri = std::make_unique<BackendBuffer>(device(), B * 4);
    rt = std::make_unique<BackendBuffer>(device(), rt_v.size() * 4);
    const size_t q_elems = static_cast<size_t>(cu_v[B]) * Hq * D;
    q = std::make_unique<BackendBuffer>(device(), q_elems * 2);
    q8 = std::make_unique<BackendBuffer>(device(), q_elems);
    qs = std::make_unique<BackendBuffer>(device(), static_cast<size_t>(B) * Hkv * 4);
    o = std::make_unique<BackendBuffer>(device(), q_elems * 2);
    ks = std::make_unique<BackendBuffer>(device(), Hkv * 4);
    vs = std::make_unique<BackendBuffer>(device(), Hkv * 4);
    fill_bf16(q->get(), q_elems, 21, 2.0f, s);
    fill_e4m3(q8->get(), q_elems, 22, 200.0f, s);
    upload(*qs, std::vector<float>(static_cast<size_t>(B) * Hkv, 2.0f / 448));
    upload(*ks, std::vector<float>(Hkv, 1.0f / 448));
    upload(*vs, std::vector<float>(Hkv, 1.0f / 448));
    batch.num_requests = B;
    batch.seq_len = upload(*seq, seq_v);
    batch.cu_seqlens_q = upload(*cu, cu_v);
    batch.req_index = upload(*ri, ri_v);
    batch.req_to_token = upload(*rt, rt_v);
    batch.max_requests = B;
    batch.max_len = L;
    batch.total_q = cu_v[B];
    batch.max_q_len = q_len;
    batch.max_seq_len = L;
    for (int b = 0; b < B; ++b) {  // causal: new token i of request b sees prefix + i + 1 keys
      const double prefix = seq_lens[b] - q_lens[b], n = q_lens[b];
      causal_pairs += n * prefix + n * (n + 1) / 2;
      all_pairs += n * seq_lens[b];  // non-causal: every new token sees all seq_len keys
    }
  }
  // (query, key) pairs one query head computes over the batch, causal and non-causal
  double causal_pairs = 0, all_pairs = 0;
  int64_t num_slots() const { return static_cast<int64_t>(B) * L; }

  AttentionParams params(KvScheme scheme, void* pool) const {
    AttentionParams p;
    p.q = q->as<uint16_t>();
    if (fp8_q(scheme)) {
      p.q = nullptr;
      p.q_fp8 = q8->as<uint8_t>();
      p.q_scale = qs->as<float>();
    }
    p.o = o->as<uint16_t>();
    p.num_q_heads = Hq;
    p.cache = {pool, num_slots(), Hkv, D, scheme};
    if (has_kv_scales(scheme)) p.scales = {ks->as<float>(), vs->as<float>()};
    p.batch = batch;
    return p;
  }
};

// A decode launch's plan in words, from cuda::decode_launch_key: the persistent kernel, or the
// splits and whether they merge in clusters (of every split).
std::string decode_launch_words(const AttentionParams& p) {
  const auto key = cuda::DecodeLaunchKey::unpack(cuda::decode_launch_key(p));
  if (key.persistent) return "persistent";
  const int splits = key.num_splits;
  std::string w = std::to_string(splits) + (splits == 1 ? " split" : " splits");
  if (key.cluster_merge) w += " in clusters of " + std::to_string(splits);
  if (key.ordered) w += " longest first";
  if (key.gather_rows) w += ", one wave";
  return w;
}

// Fills a pool of `slots` token rows (and the spare slot) with random values of the scheme's kind.
void fill_pool(void* pool, int64_t slots, int Hkv, int D, KvScheme scheme, cudaStream_t s) {
  const size_t elems = static_cast<size_t>(slots + 1) * 2 * Hkv * D;
  if (kv_codec(scheme) == KvCodec::kE5m2) {
    fill_e5m2(pool, elems, 31, 2.0f, s);  // unscaled values, as fp8-e5m2 stores them
  } else if (is_fp8(scheme)) {
    fill_e4m3(pool, elems, 31, 400.0f, s);
  } else {
    fill_bf16(pool, elems, 31, 1.0f, s);
  }
}

size_t pool_bytes(int64_t slots, int Hkv, int D, KvScheme scheme) {
  return static_cast<size_t>(slots + 1) * 2 * Hkv * D * kv_elem_bytes(scheme);
}

std::unique_ptr<BackendBuffer> make_pool(int64_t slots, int Hkv, int D, KvScheme scheme,
                                         cudaStream_t s) {
  auto pool = std::make_unique<BackendBuffer>(device(), pool_bytes(slots, Hkv, D, scheme));
  fill_pool(pool->get(), slots, Hkv, D, scheme, s);
  return pool;
}

}  // namespace

std::string run_kernel_bench(const KernelBenchOptions& o) {
  check_bench_options(o);  // before a GPU is looked for (kernel_bench.h)
  if (!cuda_available()) throw Error("bench kernels: no usable Hopper (sm_90) GPU on this machine");
  check_cuda(cudaSetDevice(o.device), "cudaSetDevice");
  cudaDeviceProp prop{};
  check_cuda(cudaGetDeviceProperties(&prop, o.device), "cudaGetDeviceProperties");
  if (prop.major != 9)
    throw Error(std::string("bench: ") + prop.name + " is not a Hopper GPU (sm_90a kernels)");
  cudaStream_t s;
  check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  // Torn down in reverse order of these lines: after every buffer declared below them (the backend
  // frees its buffers), on return and on a throw alike; the stream last.
  struct Teardown {
    cudaStream_t s;
    ~Teardown() {
      g_device = nullptr;
      cudaStreamDestroy(s);
    }
  } const teardown{s};
  const std::unique_ptr<Backend> backend = make_cuda_backend(o.device, s);
  g_device = backend.get();
  // --only: the sections to run (all when empty).
  auto want = [&](const char* section) { return selects(o.only, section); };
  Report r;
  r.line("fp8kv kernel benchmark on %s (%d SMs, %.0f GiB), median of %d runs after %d warm-up",
         prop.name, prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0, o.iters,
         o.warmup);

  // Ceilings.
  const size_t bw_bytes = o.quick ? (512ull << 20) : (4ull << 30);
  const double read_gbs = measure_read_gbs(bw_bytes, o, s);
  const double copy_gbs = measure_copy_gbs(bw_bytes / 2, o, s);
  r.record("ceiling", "read", {{"gbs", read_gbs}});
  r.record("ceiling", "copy", {{"gbs", copy_gbs}});
  r.line("");
  r.line("ceilings: read %.0f GB/s | copy (read+write) %.0f GB/s", read_gbs, copy_gbs);
  // The JSON so far, after the ceilings and after each section (Report::write_json).
  auto checkpoint = [&] {
    check_cuda(cudaStreamSynchronize(s), "bench section");
    if (!o.json_path.empty()) r.write_json(o.json_path, prop.name, /*complete=*/false);
  };
  checkpoint();

  // Decode: the one kernel per scheme. Rows: the three reference shapes (Hq 32, Hkv 8, D 128),
  // head_dim 64 and 256, GQA 7, one long request (split-KV), a large batch of short requests,
  // each with every request's slots contiguous (a request's tokens were written in order); and
  // the first shape and B=256 L=1024 (the persistent kernel) again with the slot table a random
  // permutation of the pool (a fragmented serving pool: every token row a separate gather).
  r.line("");
  r.line(
      "decode  shape                              scheme              time_us   cache_GB/s  "
      "%%read_bw  time/bf16  %%same_size_read");
  r.line(
      "  (cache_GB/s counts only the K/V cache bytes read: B*L*Hkv*2*D*elem; Q, O and the slot "
      "table are not counted;");
  r.line(
      "   %%same_size_read: against the ceiling's read kernel over as many bytes, timed the same "
      "way, which pays");
  r.line("   the launch's ramp and tail that the ceiling's 4 GiB read does not)");
  std::map<size_t, double> same_size_read;  // GB/s of the ceiling's read kernel, by bytes read
  auto same_read_gbs = [&](size_t bytes) {
    auto it = same_size_read.find(bytes);
    if (it == same_size_read.end()) {
      it = same_size_read.emplace(bytes, measure_read_gbs(bytes, o, s)).first;
    }
    return it->second;
  };
  {  // the decode rows
    std::vector<DecodeCase> cases = decode_cases(o.quick);
    if (!want("decode")) cases.clear();
    // Every row's pools (one per scheme, each on a 2 MB boundary) in one arena, allocated once for
    // the largest row, as a serving engine allocates its pool once: pools allocated per row, where
    // the last row's had just been freed, read some rows slower in some runs, all of a row's
    // schemes alike or the first FP8 scheme after bf16 alone (docs/GPU.md, forty-fourth session).
    // A row's pools in the arena: scheme i's at offsets[i], offsets.back() the row's bytes.
    const auto pool_offsets = [](int64_t slots, int Hkv, int D) {
      constexpr size_t kPoolAlign = size_t{2} << 20;
      std::vector<size_t> offsets{0};
      for (KvScheme scheme : kSchemes) {
        const size_t bytes = pool_bytes(slots, Hkv, D, scheme);
        offsets.push_back(offsets.back() + (bytes + kPoolAlign - 1) / kPoolAlign * kPoolAlign);
      }
      return offsets;
    };
    size_t arena_bytes = 16;
    for (const DecodeCase& c : cases) {
      if (!selects(o.decode_cases, c.name())) continue;
      arena_bytes =
          std::max(arena_bytes, pool_offsets(static_cast<int64_t>(c.B) * c.L, c.Hkv, c.D).back());
    }
    BackendBuffer pool_arena(device(), arena_bytes);  // freed at the decode section's end
    for (const DecodeCase& c : cases) {
      const std::string name = c.name();
      if (!selects(o.decode_cases, name)) continue;
      std::vector<int> lengths(c.B, c.L);
      if (c.mixed) {
        for (int b = 0; b < c.B; ++b) lengths[b] = 1 + (b * 1021) % c.L;
      }
      const double keys = std::accumulate(lengths.begin(), lengths.end(), 0.0);
      std::vector<int32_t> served;
      if (c.served != ServedPool::kNo) served = served_slot_table(c.B, c.L, c.served);
      BenchBatch bb(lengths, std::vector<int>(c.B, 1), c.Hq, c.Hkv, c.D, s, c.scattered,
                    c.served != ServedPool::kNo ? &served : nullptr);
      // The order the model runner gives every layer of a decode step (AttentionBatch::
      // decode_order): longest first, made on the host once a step.
      const std::vector<int32_t> seq32(lengths.begin(), lengths.end());
      BackendBuffer order(device(), decode_order_longest_first(seq32.data(), c.B));
      char shape[64];
      std::snprintf(shape, sizeof shape, "B=%d L=%s%d Hq%d/%d D%d%s%s%s", c.B, c.mixed ? "1.." : "",
                    c.L, c.Hq, c.Hkv, c.D, c.scattered ? " scattered" : "",
                    c.unordered ? " unordered" : "",
                    c.served == ServedPool::kTokenSlots  ? " served, token slots"
                    : c.served == ServedPool::kSlotPages ? " served, slot pages"
                                                         : "");
      // Every scheme's pool, params and workspace first, then all of them timed in turns
      // (time_us_in_turns), as the quantize and prefill rows: the same clocks for each, and no run
      // right after a run of itself (whose last bytes would still sit in L2).
      std::vector<std::unique_ptr<BackendBuffer>> workspaces;
      std::vector<AttentionParams> params;
      std::vector<std::function<void()>> runs;
      std::string launches;  // each scheme's plan, after the shape's rows
      const std::vector<size_t> offsets = pool_offsets(bb.num_slots(), c.Hkv, c.D);
      for (size_t i = 0; i < std::size(kSchemes); ++i) {
        const KvScheme scheme = kSchemes[i];
        void* pool = pool_arena.as<uint8_t>() + offsets[i];
        fill_pool(pool, bb.num_slots(), c.Hkv, c.D, scheme, s);
        params.push_back(bb.params(scheme, pool));
        if (!c.unordered) params.back().batch.decode_order = order.as<const int32_t>();
        // The caller's word on its slots, as an engine gives it: consecutive rows and our pages
        // say so; scattered rows and LightLLM's token slots do not.
        params.back().batch.slots_in_pages = !c.scattered && c.served != ServedPool::kTokenSlots;
        const AttentionParams& p = params.back();
        launches += std::string(launches.empty() ? "" : "; ") + scheme_name(scheme) + " " +
                    decode_launch_words(p);
        workspaces.push_back(std::make_unique<BackendBuffer>(
            device(), std::max<size_t>(cuda::decode_workspace_bytes(p), 16)));
        BackendBuffer& ws = *workspaces.back();
        cuda::clear_decode_workspace(ws.get(), ws.bytes(), s);  // the split counters (launchers.h)
      }
      for (size_t i = 0; i < params.size(); ++i) {
        runs.push_back(
            [&, i] { cuda::launch_decode_attention(params[i], workspaces[i]->get(), s); });
      }
      // At least 20 warm-up runs of each: with 5, the first FP8 scheme after a bf16 row measured
      // slower than its peers (D 256, scattered; docs/GPU.md).
      const std::vector<double> times = time_us_in_turns(runs, std::max(o.warmup, 20), o.iters, s);
      double bf16_us = NAN;
      for (size_t i = 0; i < std::size(kSchemes); ++i) {
        const KvScheme scheme = kSchemes[i];
        const double us = times[i];
        const double bytes = keys * c.Hkv * 2 * c.D * kv_elem_bytes(scheme);
        const double gbs = bytes / us * 1e-3;
        if (scheme == KvScheme::kBf16) bf16_us = us;
#ifdef FP8KV_DECODE_TIMELINE
        if (scheme == KvScheme::kBf16 || scheme == KvScheme::kFp8PerHead)
          print_decode_timeline(runs[i], std::string(shape) + " " + scheme_name(scheme), us,
                                bytes / read_gbs * 1e-3);
#endif
        // The read kernel's 16-byte vectors: every row's cache bytes are a multiple of 16.
        const double same_gbs = same_read_gbs(static_cast<size_t>(bytes));
        r.line("  %-40s %-18s %8.1f   %10.0f   %6.1f%%   %8.2f   %6.1f%%", shape,
               scheme_name(scheme), us, gbs, 100.0 * gbs / read_gbs, us / bf16_us,
               100.0 * gbs / same_gbs);
        r.record("decode", name + "_" + scheme_name(scheme),
                 {{"B", double(c.B)},
                  {"L", double(c.L)},
                  {"Hq", double(c.Hq)},
                  {"Hkv", double(c.Hkv)},
                  {"D", double(c.D)},
                  {"scattered", c.scattered ? 1.0 : 0.0},
                  {"us", us},
                  {"gbs", gbs},
                  {"frac_read_bw", gbs / read_gbs},
                  {"ratio_bf16", us / bf16_us},
                  {"frac_same_size_read", gbs / same_gbs}});
      }
      r.line("    launches: %s", launches.c_str());
      // The slot table's own peer (rows of one length: the table is B x L slots): the
      // fp8-per-head pool read through it in that kernel's copies, timed the same way.
      if (!c.mixed && (c.scattered || c.served != ServedPool::kNo || name == "B64_L4096")) {
        const size_t i = static_cast<size_t>(
            std::find(std::begin(kSchemes), std::end(kSchemes), KvScheme::kFp8PerHead) -
            std::begin(kSchemes));
        const int piece = cuda::decode_mma_kv_heads(KvScheme::kFp8PerHead, c.D) * c.D;
        const int row_bytes = 2 * c.Hkv * c.D;
        const int n_slots = c.B * c.L;
        const uint8_t* pool = pool_arena.as<uint8_t>() + offsets[i];
        int sms = 0;
        check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "attr");
        BackendBuffer sink(device(), 64);
        const double us = time_us(
            [&] {
              gather_read_kernel<<<sms * 8, 256, 0, s>>>(pool, bb.batch.req_to_token, n_slots,
                                                         row_bytes, piece, sink.as<uint4>());
            },
            std::max(o.warmup, 20), o.iters, s);
        const double gbs = static_cast<double>(n_slots) * row_bytes / us * 1e-3;
        const double ph_us = times[i];
        r.line(
            "    gather read of the same rows in %d-byte pieces: %.1f us, %.0f GB/s (%.1f%% of "
            "the read ceiling); fp8-per-head at %.1f%% of it",
            piece, us, gbs, 100.0 * gbs / read_gbs, 100.0 * us / ph_us);
        r.record("decode_gather", name,
                 {{"piece", double(piece)},
                  {"us", us},
                  {"gbs", gbs},
                  {"frac_read_bw", gbs / read_gbs},
                  {"fp8_per_head_frac", us / ph_us}});
      }
    }
  }
  for (const auto& [bytes, gbs] : same_size_read) {
    r.line("  same-size read: %.1f MB at %.0f GB/s (%.1f%% of the read ceiling)", bytes / 1e6, gbs,
           100.0 * gbs / read_gbs);
  }

  // Quantize-on-write.
  checkpoint();
  if (want("quantize")) {
    r.line("");
    // T=16384 is the issue's row (a 67 MB input: a copy that short pays ramp-up and tail);
    // T=65536 shows the same kernels on a 4x longer write. Slots are scattered (a shuffled
    // table, as a fragmented serving pool gives them), and once more consecutive at T=16384 (a
    // fresh pool's prefill): what the scattered rows' writes cost.
    struct QuantizeCase {
      int T;
      bool scattered;
    };
    const std::vector<QuantizeCase> cases =
        o.quick ? std::vector<QuantizeCase>{{4096, true}}
                : std::vector<QuantizeCase>{{16384, true}, {65536, true}, {16384, false}};
    for (const QuantizeCase& qc : cases) {
      const int T = qc.T;
      const bool scattered = qc.scattered;
      const int Hkv = 8, D = 128;
      // A peer of the same size: cudaMemcpy of the bf16 input (a ~30-50 us copy pays the ramp-up
      // and tail that the 2 GiB ceiling copy does not).
      const size_t in_bytes = static_cast<size_t>(T) * 2 * Hkv * D * 2;
      const double copy_same_gbs = measure_copy_gbs(in_bytes, o, s);
      r.line(
          "quantize-on-write T x 8 KV heads x 128   scheme             time_us   GB/s(r+w)  "
          "%%copy_bw  observe_overhead  "
          "%%copy_same_size | in a stream: us/launch  %%copy_bw  observe_overhead  "
          "(a %.0f MB cudaMemcpy: %.0f GB/s)",
          in_bytes / 1e6, copy_same_gbs);
      // kTurns inputs and as many slot tables (disjoint quarters of a shuffled pool), taken in
      // turn by every launch, so that each launch reads its input from memory and writes slots
      // that the launches just before it did not: with one input, a run timed right after another
      // found part of it in L2, and with one slot table a run timed right after another found its
      // lines in L2 still dirty and wrote over them (both measured as faster rows).
      constexpr int kTurns = 4;
      const int64_t slots = kTurns * static_cast<int64_t>(T);
      std::vector<int32_t> slot_v(slots);
      std::iota(slot_v.begin(), slot_v.end(), 0);
      if (scattered) std::shuffle(slot_v.begin(), slot_v.end(), std::mt19937(99));
      BackendBuffer d_slots(device(), slots * 4), kv(device(), in_bytes * kTurns),
          amax(device(), 2 * Hkv * 4);
      BackendBuffer ks(device(), Hkv * 4), vs(device(), Hkv * 4);
      upload(d_slots, slot_v);
      upload(ks, std::vector<float>(Hkv, 1.0f / 448));
      upload(vs, std::vector<float>(Hkv, 1.0f / 448));
      device().memset(amax.get(), 0, amax.bytes());  // on the bench stream, before the kernels
      fill_bf16(kv.get(), static_cast<size_t>(T) * 2 * Hkv * D * kTurns, 41, 2.0f, s);
      // Every scheme, with and without the observation, timed in turns (time_us_in_turns), each
      // with its own pool.
      std::vector<std::unique_ptr<BackendBuffer>> pools;
      std::vector<QuantizeKvParams> params;  // [scheme][observe]
      for (KvScheme scheme : kSchemes) {
        for (const bool observe : {false, true}) {
          pools.push_back(make_pool(slots, Hkv, D, scheme, s));
          QuantizeKvParams p;
          p.num_tokens = T;
          p.cache = {pools.back()->get(), slots, Hkv, D, scheme};
          if (has_kv_scales(scheme)) p.scales = {ks.as<float>(), vs.as<float>()};
          if (observe) p.observe_amax = amax.as<float>();
          params.push_back(p);
        }
      }
      int turn = 0;  // the next input and slot table, over every launch
      auto launch = [&turn, &kv, &d_slots, in_bytes, T, s](const QuantizeKvParams& p) {
        const int k = turn++ % kTurns;
        QuantizeKvParams q = p;
        q.kv = reinterpret_cast<const uint16_t*>(kv.as<uint8_t>() + in_bytes * k);
        q.slots = d_slots.as<int32_t>() + static_cast<int64_t>(k) * T;
        cuda::launch_quantize_kv(q, s);
      };
      // One launch between an event pair (what a lone write costs, its launch latency and ramp
      // included), and kStream launches back to back (as in a model's step, where the next
      // kernel's launch overlaps this one's run): the time per launch.
      constexpr int kStream = 8;
      std::vector<std::function<void()>> runs, streams;
      for (const QuantizeKvParams& p : params) {
        runs.push_back([&launch, &p] { launch(p); });
        streams.push_back([&launch, &p] {
          for (int i = 0; i < kStream; ++i) launch(p);
        });
      }
      // At least 20 warm-up runs of each, as decode; each timed run settled by one of its own
      // (time_us_in_turns): in turns, the run after bf16's write paid for part of its
      // write-back (fp8-per-tensor, timed right after bf16 observed, measured below fp8-per-head,
      // the same kernel but for the scale's address).
      const int warm = std::max(o.warmup, 20);
      const std::vector<double> times = time_us_in_turns(runs, warm, o.iters, s, /*settle=*/true);
      const std::vector<double> stream_times =
          time_us_in_turns(streams, warm / kStream + 1, o.iters, s, /*settle=*/true);
      for (size_t i = 0; i < std::size(kSchemes); ++i) {
        const KvScheme scheme = kSchemes[i];
        const double us = times[2 * i], us_obs = times[2 * i + 1];
        const double us_stream = stream_times[2 * i] / kStream;
        const double us_stream_obs = stream_times[2 * i + 1] / kStream;
        const double bytes = static_cast<double>(T) * 2 * Hkv * D * (2 + kv_elem_bytes(scheme));
        const double gbs = bytes / us * 1e-3, gbs_stream = bytes / us_stream * 1e-3;
        r.line(
            "  T=%-6d %-29s %-18s %8.1f   %9.0f   %6.1f%%   %+6.1f%%       "
            "     %6.1f%%   | %8.1f   %6.1f%%   %+6.1f%%",
            T, scattered ? "" : "consecutive slots", scheme_name(scheme), us, gbs,
            100.0 * gbs / copy_gbs, 100.0 * (us_obs / us - 1.0), 100.0 * gbs / copy_same_gbs,
            us_stream, 100.0 * gbs_stream / copy_gbs, 100.0 * (us_stream_obs / us_stream - 1.0));
        r.record("quantize",
                 std::string("T") + std::to_string(T) + (scattered ? "_" : "_consecutive_") +
                     scheme_name(scheme),
                 {{"T", double(T)},
                  {"scattered", scattered ? 1.0 : 0.0},
                  {"us", us},
                  {"us_observe", us_obs},
                  {"gbs", gbs},
                  {"frac_copy_bw", gbs / copy_gbs},
                  {"observe_overhead", us_obs / us - 1.0},
                  {"frac_copy_same_size", gbs / copy_same_gbs},
                  {"us_stream", us_stream},
                  {"frac_copy_bw_stream", gbs_stream / copy_gbs},
                  {"observe_overhead_stream", us_stream_obs / us_stream - 1.0}});
      }
    }
  }
  // The GEMM ceilings, for the prefill and linear rows: measured after the decode and quantize
  // rows, so that the memory-bound rows do not run right after seconds of full-power GEMMs
  // (scripts/gpu-check samples the SM clock over the whole run: clocks.csv).
  checkpoint();
  double bf16_tflops = NAN, fp8_tflops = NAN;
  if (o.gemm) {
    const int n = o.quick ? 4096 : 8192;
    bf16_tflops = measure_gemm_tflops(false, n, o, s);
    fp8_tflops = measure_gemm_tflops(true, n, o, s);
    r.record("ceiling", "gemm_bf16", {{"tflops", bf16_tflops}, {"n", double(n)}});
    r.record("ceiling", "gemm_fp8", {{"tflops", fp8_tflops}, {"n", double(n)}});
    r.line("");
    r.line("ceilings: cuBLASLt GEMM %d^3: BF16 %.0f TFLOP/s, FP8 %.0f TFLOP/s", n, bf16_tflops,
           fp8_tflops);
  }

  // Prefill: the reference shape (causal B=2 L=8192 Hq32/Hkv8 D128) with every scheme and every
  // built kernel of each (the default, the warp-specialized kernel's layouts and options; rows
  // "<case>_<scheme>" for the default, else "<case>_<scheme>_<config>");
  // then a sweep at 16k tokens per batch (L = 1k..32k), head_dim 64 and 256, GQA 7, and a serving
  // engine's cached-prefix batch (8 requests of 1000 cached + 100..2048 new tokens), the same
  // kernels for the three main schemes, and the reference shape non-causal (record suffix
  // _noncausal; every scheme). Slots are scattered (a shuffled slot table): each K/V row is a
  // separate gather, as in a fragmented pool; but for the _runs rows (consecutive slots). FLOPs:
  // 4 * D * Hq * (query, key) pairs, the causal pairs counted exactly; non-causal 4 * D * Hq *
  // q_len * seq_len per request.
  checkpoint();
  if (o.prefill && want("prefill")) {
    r.line("");
    r.line(
        "prefill (causal unless said)               scheme             kernel          time_us   "
        "TFLOP/s  %%GEMM (of the fp8 GEMM where P V runs on e4m3, fp8_p; else of the bf16 GEMM)");
    r.line("  (each case's kernels timed in turns: %d warm-up round%s, the median of %d rounds)",
           o.prefill_warmup, o.prefill_warmup == 1 ? "" : "s", std::max(5, o.iters / 2));
    r.record("setting", "prefill_rest", {{"ms", double(o.prefill_rest_ms)}});
    if (o.prefill_rest_ms > 0) {
      r.line(
          "  (the card idles %d ms before each scheme's kernels at %s, as the peer's first "
          "prefill row starts on a rested card)",
          o.prefill_rest_ms, prefill_cases(o.quick)[0].name.c_str());
    }
    const std::vector<PrefillCase> cases = prefill_cases(o.quick);
    for (const PrefillCase& c : cases) {
      if (!selects(o.prefill_cases, c.name)) continue;
      BenchBatch bb(c.seq, c.q, c.Hq, c.Hkv, c.D, s);
      char shape[64];
      if (c.name.rfind("prefix", 0) == 0) {
        std::snprintf(shape, sizeof shape, "8 x (1000 cached + 100..2048 new) D%d", c.D);
      } else {
        std::snprintf(shape, sizeof shape, "B=%d L=%d Hq%d/%d D%d%s", bb.B, bb.L, c.Hq, c.Hkv, c.D,
                      c.causal ? "" : " non-causal");
      }
      const double flops = 4.0 * c.D * c.Hq * (c.causal ? bb.causal_pairs : bb.all_pairs);
      // The reference shape, causal and not: every scheme; the sweep: the three main schemes.
      const bool reference = c.name == cases[0].name || !c.causal;
      auto main_scheme = [](KvScheme k) {
        return k == KvScheme::kBf16 || k == KvScheme::kFp8PerTensor || k == KvScheme::kFp8PerHead;
      };
      // The reference shape with each request's slots consecutive (rows "<case>_runs_<scheme>",
      // the three main schemes' default kernels): a pool that hands out runs of slots, the layout
      // of cuDNN's dense K/V (the report sets these rows beside the peer's figure for the same
      // shape). Timed in turns with the scattered rows' configs: as a case of their own, run
      // right after this one, fp8-per-head read slower than here, and as fast alone
      // (docs/GPU.md, thirty-first session).
      std::optional<BenchBatch> runs_batch;
      if (reference) runs_batch.emplace(c.seq, c.q, c.Hq, c.Hkv, c.D, s, /*scattered=*/false);
      for (KvScheme scheme : kSchemes) {
        if (!reference && !main_scheme(scheme)) continue;
        // The rest: the stream drained, then the host sleeps (the GPU idles, its power falls).
        if (c.name == cases[0].name && o.prefill_rest_ms > 0) {
          check_cuda(cudaStreamSynchronize(s), "prefill rest");
          std::this_thread::sleep_for(std::chrono::milliseconds(o.prefill_rest_ms));
        }
        auto pool = make_pool(bb.num_slots(), c.Hkv, c.D, scheme, s);
        AttentionParams p = bb.params(scheme, pool->get());
        p.causal = c.causal;
        std::vector<cuda::PrefillConfig> configs = {cuda::PrefillConfig::kDefault};
        if (scheme == KvScheme::kFp8PerHead) {  // the warp-specialized kernel's options
          configs.push_back(cuda::PrefillConfig::kWarpSpecialized);
          if (c.D == 128) {  // the options, built for D = 128
            configs.push_back(cuda::PrefillConfig::kWsSwizzle);
          }
          // persistent CTAs (D 64 and 128; the default for even batches of short requests)
          if (c.D != 256) configs.push_back(cuda::PrefillConfig::kWsPersistent);
        } else {  // the bf16-Q schemes: the ws kernel with 16-bit operands (swizzled only)
          configs.push_back(cuda::PrefillConfig::kWsSwizzle);
          // the widened schemes' persistent instances, D 64 and 128 (bf16's swizzled ones are so
          // as they are)
          if (scheme != KvScheme::kBf16 && c.D != 256) {
            configs.push_back(cuda::PrefillConfig::kWsPersistent);
          }
        }
        if (scheme == KvScheme::kFp8PerHead && c.name == cases[0].name) {
          configs.push_back(
              cuda::PrefillConfig::kWsDiagConsumers);  // one side of the pipeline alone
          configs.push_back(cuda::PrefillConfig::kWsDiagProducer);
        }
        // The configs that launch (a config not built for the shape throws here, named), then
        // all of them timed in turns (time_us_in_turns: the same clocks for each); last, the
        // default kernel on consecutive slots (above).
        std::vector<cuda::PrefillConfig> timed;
        std::vector<std::function<void()>> runs;
        for (cuda::PrefillConfig config : configs) {
          auto run = [&p, config, s] { cuda::launch_prefill_attention(p, config, s); };
          try {
            run();
          } catch (const Error& e) {
            r.line("  %s %s: %s", scheme_name(scheme), cuda::prefill_config_name(config), e.what());
            continue;
          }
          timed.push_back(config);
          runs.push_back(run);
        }
        const bool with_runs = runs_batch && main_scheme(scheme);
        AttentionParams p_runs;
        if (with_runs) {
          p_runs = runs_batch->params(scheme, pool->get());
          p_runs.causal = c.causal;
          runs.push_back([&p_runs, s] {
            cuda::launch_prefill_attention(p_runs, cuda::PrefillConfig::kDefault, s);
          });
        }
        std::vector<double> times;
        try {
          times = time_us_in_turns(runs, o.prefill_warmup, std::max(5, o.iters / 2), s);
        } catch (const Error& e) {
          r.line("  %s: %s", scheme_name(scheme), e.what());
          continue;
        }
#ifdef FP8KV_PREFILL_TIMELINE
        if (c.name == cases[0].name &&
            (scheme == KvScheme::kFp8PerHead || scheme == KvScheme::kBf16 ||
             scheme == KvScheme::kFp8PerTensor)) {
          print_prefill_timeline(
              [&p, s] { cuda::launch_prefill_attention(p, cuda::PrefillConfig::kDefault, s); },
              std::string(shape) + " " + scheme_name(scheme) + " default");
        }
#endif
        // One row: its shape's label, kernel, record name and time.
        auto row = [&](const std::string& label, cuda::PrefillConfig config, const std::string& key,
                       double us) {
          const double tflops = flops / us * 1e-6;
          // The kernel's own operands' ceiling: e4m3 where P V runs on e4m3 (fp8_p). fp8-per-tensor
          // at D 128 runs Q K^T as two e4m3 products (Q split in hi and lo), 1.5x one product's
          // work, which the column does not count: the ratio to cuDNN is its measure.
          const double ceiling = fp8_p(scheme, /*prefill=*/true, c.D) ? fp8_tflops : bf16_tflops;
          r.line("  %-40s %-18s %-13s %8.1f   %7.1f  %6.1f%%", label.c_str(), scheme_name(scheme),
                 cuda::prefill_config_name(config), us, tflops, 100.0 * tflops / ceiling);
          r.record("prefill", key,
                   {{"B", double(bb.B)},
                    {"L", double(bb.L)},
                    {"Hq", double(c.Hq)},
                    {"Hkv", double(c.Hkv)},
                    {"D", double(c.D)},
                    {"causal", c.causal ? 1.0 : 0.0},
                    {"us", us},
                    {"tflops", tflops},
                    {"frac_gemm", tflops / ceiling}});
        };
        for (size_t k = 0; k < timed.size(); ++k) {
          const cuda::PrefillConfig config = timed[k];
          std::string key = c.name + "_" + scheme_name(scheme);
          if (config != cuda::PrefillConfig::kDefault) {
            key += std::string("_") + cuda::prefill_config_name(config);
          }
          row(shape, config, key, times[k]);
        }
        if (with_runs) {
          row(std::string(shape) + " runs", cuda::PrefillConfig::kDefault,
              c.name + "_runs_" + scheme_name(scheme), times.back());
        }
      }
    }
  }

  // The model's linear on bf16 weights, x fp32 [m, k] -> y fp32 [m, n]: cuBLAS (ModelOps::linear)
  // and the fixed-order kernel (linear_ordered, 8 runs) that exact tensor parallelism uses.
  checkpoint();
  if (want("linear")) {
    r.line("");
    r.line(
        "model linear, bf16 weights     m x n x k            cuBLAS TFLOP/s  fixed-order TFLOP/s  "
        "fixed/cuBLAS  %%bf16_gemm");
    auto ops = make_cuda_model_ops(*backend, s);
    struct Gemm {
      int m, n, k;
    };
    const std::vector<Gemm> gemms =
        o.quick ? std::vector<Gemm>{{256, 4096, 4096}}
                : std::vector<Gemm>{{1024, 4096, 4096}, {1024, 4096, 14336}, {32, 4096, 14336}};
    for (const Gemm& g : gemms) {
      BackendBuffer x(device(), static_cast<size_t>(g.m) * g.k * 4),
          w(device(), static_cast<size_t>(g.n) * g.k * 2),
          y(device(), static_cast<size_t>(g.m) * g.n * 4),
          x16(device(), static_cast<size_t>(g.m) * g.k * 2);
      fill_bf16(x16.get(), static_cast<size_t>(g.m) * g.k, 51, 1.0f, s);
      ops->from_bf16(x16.as<uint16_t>(), x.as<float>(), static_cast<int64_t>(g.m) * g.k);
      fill_bf16(w.get(), static_cast<size_t>(g.n) * g.k, 52, 0.02f, s);
      const WeightView wv{w.get(), WeightDtype::kBf16};
      const double flop = 2.0 * g.m * g.n * g.k;
      const double us_fast =
          time_us([&] { ops->linear(x.as<float>(), wv, nullptr, y.as<float>(), g.m, g.n, g.k); },
                  o.warmup, o.iters, s);
      const double us_ord = time_us(
          [&] { ops->linear_ordered(x.as<float>(), wv, nullptr, y.as<float>(), g.m, g.n, g.k, 8); },
          std::min(o.warmup, 2), std::max(3, o.iters / 4), s);
      const double tf_fast = flop / us_fast * 1e-6, tf_ord = flop / us_ord * 1e-6;
      r.line("  %-28s %5d x %5d x %5d   %12.1f   %18.1f   %10.3f   %8.1f%%", "", g.m, g.n, g.k,
             tf_fast, tf_ord, tf_ord / tf_fast, 100.0 * tf_ord / bf16_tflops);
      r.record("linear",
               "m" + std::to_string(g.m) + "_n" + std::to_string(g.n) + "_k" + std::to_string(g.k),
               {{"cublas_tflops", tf_fast},
                {"ordered_tflops", tf_ord},
                {"ordered_over_cublas", tf_ord / tf_fast}});
    }
  }
  // The decode step's GEMMs (a batch of tokens, bf16 weights that count by their bytes) as the
  // model runs them (ModelOps::linear_bf16: cuBLAS), against the read ceiling: what the model's
  // GEMMs leave of the bandwidth. The weights rotate through copies of at least 256 MB in all, so
  // that each run reads them from memory, not from L2, as a model step does.
  checkpoint();
  if (want("linear")) {
    r.line("");
    r.line("decode linear, bf16 weights    m x n x k            time_us  weights_GB/s  %%read_bw");
    auto ops = make_cuda_model_ops(*backend, s);
    struct Gemm {
      const char* what;
      int m, n, k;
    };
    const std::vector<Gemm> gemms =
        o.quick ? std::vector<Gemm>{{"8B q/o", 32, 4096, 4096}}
                : std::vector<Gemm>{{"8B qkv (merged)", 32, 6144, 4096},
                                    {"8B q/o", 32, 4096, 4096},
                                    {"8B k/v (before the merge)", 32, 2048, 4096},
                                    {"8B gate_up", 32, 28672, 4096},
                                    {"8B down", 32, 4096, 14336},
                                    {"8B lm_head", 32, 128256, 4096},
                                    {"8B q/o", 1, 4096, 4096},
                                    {"8B q/o", 64, 4096, 4096},
                                    {"8B qkv (merged)", 64, 6144, 4096},
                                    {"8B down", 64, 4096, 14336}};
    for (const Gemm& g : gemms) {
      const size_t wbytes = static_cast<size_t>(g.n) * g.k * 2;
      const int copies =
          static_cast<int>(std::max<size_t>(1, ((size_t{256} << 20) + wbytes - 1) / wbytes));
      BackendBuffer w(device(), wbytes * copies), x16(device(), static_cast<size_t>(g.m) * g.k * 2),
          y(device(), static_cast<size_t>(g.m) * g.n * 4);
      fill_bf16(x16.get(), static_cast<size_t>(g.m) * g.k, 53, 1.0f, s);
      fill_bf16(w.get(), static_cast<size_t>(g.n) * g.k * copies, 54, 0.02f, s);
      int turn = 0;
      const double us = time_us(
          [&] {
            const void* wt =
                static_cast<const char*>(w.get()) + wbytes * static_cast<size_t>(turn++ % copies);
            ops->linear_bf16(x16.as<uint16_t>(), {wt, WeightDtype::kBf16}, nullptr, y.as<float>(),
                             g.m, g.n, g.k);
          },
          o.warmup, o.iters, s);
      const double gbs = wbytes / us * 1e-3;
      r.line("  %-28s %5d x %6d x %5d   %8.1f   %11.0f   %7.1f%%", g.what, g.m, g.n, g.k, us, gbs,
             100.0 * gbs / read_gbs);
      r.record("decode_linear",
               "m" + std::to_string(g.m) + "_n" + std::to_string(g.n) + "_k" + std::to_string(g.k),
               {{"us", us}, {"gbs", gbs}, {"frac_read_bw", gbs / read_gbs}});
    }
  }
  // The bare bulk-copy ring (bench/ring_bench.h), only when --only names it: what one CTA per SM
  // streams through a ring of stages with nothing else in the way, against the read ceiling.
  checkpoint();
  if (!o.only.empty() && want("ring")) {
    r.line("");
    r.line(
        "ring: one CTA per SM, items of 512 KB dealt round-robin, 2 KB slot rows   hold_ns  "
        "stall_ns   time_us      GB/s  %%read_bw");
    struct Ring {
      const char* what;
      RingShape shape;
    };
    const std::vector<Ring> rings = {
        {"512 B K/V copies, 64 tokens, 3 x 64 KB, 8 x 16 lanes",
         {512, 64, 2, true, 3, 65536, 8, 16}},
        {"1 KB K/V copies, 32 tokens, 3 x 64 KB, 4 x 16 lanes",
         {1024, 32, 1, true, 3, 65536, 4, 16}},
        {"2 KB rows, 32 tokens, 3 x 64 KB, 2 x 16 lanes", {2048, 32, 1, false, 3, 65536, 2, 16}},
        {"256 B K/V copies, 64 tokens, 6 x 32 KB, 8 x 16 lanes",
         {256, 64, 4, true, 6, 32768, 8, 16}},
        {"512 B K/V copies, 64 tokens, 2 x 64 KB, 8 x 16 lanes",
         {512, 64, 2, true, 2, 65536, 8, 16}}};
    const int requests = o.quick ? 32 : 256, tokens = 2048, row_bytes = 2048;
    BackendBuffer pool(device(), static_cast<size_t>(requests) * tokens * row_bytes);
    fill_e4m3(pool.get(), pool.bytes(), 61, 1.0f, s);
    int sms = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, o.device), "attr");
    struct Hold {
      int hold_ns, stall_ns;
    };
    for (const Ring& g : rings) {
      // hold: about the FP8 decode consumers' compute per 64 KB stage, scaled to the stage;
      // stall: an item's epilogue.
      for (const Hold h : {Hold{0, 0}, Hold{1300, 0}, Hold{1300, 2500}}) {
        const RingBenchParams p{pool.as<uint8_t>(),
                                row_bytes,
                                requests,
                                tokens,
                                g.shape,
                                512,
                                static_cast<int>(int64_t{h.hold_ns} * g.shape.stage_bytes / 65536),
                                h.stall_ns};
        const double us = time_us([&] { launch_ring_bench(p, sms, s); }, o.warmup, o.iters, s);
        const double gbs = ring_bench_bytes(p) / us * 1e-3;
        r.line("  %-68s %7d  %8d  %8.1f  %8.0f  %7.1f%%", g.what, p.hold_ns, p.stall_ns, us, gbs,
               100.0 * gbs / read_gbs);
        r.record("ring",
                 std::string(g.what) + " hold " + std::to_string(p.hold_ns) + " stall " +
                     std::to_string(p.stall_ns),
                 {{"us", us}, {"gbs", gbs}, {"frac_read_bw", gbs / read_gbs}});
      }
    }
  }
  check_cuda(cudaStreamSynchronize(s), "bench");
  if (!o.json_path.empty()) r.write_json(o.json_path, prop.name, /*complete=*/true);
  return r.text();
}

}  // namespace fp8kv
