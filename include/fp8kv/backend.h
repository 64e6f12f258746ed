// The Backend interface: every kernel of fp8kv, with a CPU implementation (the reference,
// kernels/cpu) and a CUDA implementation (kernels/cuda) of the same semantics.
//
// Pointers in the params structs point into the backend's own memory (host memory for the CPU
// backend, device memory for the CUDA backend); use Backend::alloc / upload / download to move
// data. Shapes are given in the comments; all arrays are dense and row-major.
// Element types: bf16 values are uint16_t bit patterns, e4m3 values uint8_t codes (fp8.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/dtype.h"
#include "fp8kv/error.h"

#include "fp8kv/export.h"
#include "fp8kv/scheme.h"

namespace fp8kv {

// One layer of the token-slot KV pool.
struct KvCacheLayer {
  void* data = nullptr;   // [num_slots + 1, 2 * num_kv_heads, head_dim]: per slot K heads then
                          // V heads; bf16 for KvScheme::kBf16, e4m3 otherwise. Slot num_slots
                          // is the padding slot, never handed out.
  int64_t num_slots = 0;  // usable slots
  int num_kv_heads = 0;   // Hkv
  int head_dim = 0;       // D
  KvScheme scheme = KvScheme::kBf16;
};

// K/V scales of one layer (real = fp8 * scale). Unused for kBf16.
struct KvLayerScales {
  const float* k = nullptr;  // per-head: [Hkv]; per-tensor: [1]
  const float* v = nullptr;  // per-head: [Hkv]; per-tensor: [1]
};

// Quantize-on-write: new tokens' K/V into the pool at their slots.
struct QuantizeKvParams {
  const uint16_t* kv = nullptr;    // [num_tokens, 2 * Hkv, D] bf16: K heads then V heads
  const int32_t* slots = nullptr;  // [num_tokens] destination slot of each token, in [0, num_slots)
  int64_t num_tokens = 0;
  KvCacheLayer cache;
  KvLayerScales scales;
  // Optional: running abs-max of what is written, [2 * Hkv] (K heads then V heads), updated in
  // place with max(old, |x|) in the same pass. A NaN or infinity in K/V makes the entry
  // non-finite (the observer then refuses it).
  float* observe_amax = nullptr;
  // Optional, a promise: slots, num_tokens and cache.num_slots are those of an earlier
  // quantize_kv on this backend, and the device memory under slots has not changed since (a
  // step writes every layer at the same slots). The CUDA backend then keeps its last slot check
  // when that check was of these same three (one check kernel and one memset fewer per layer),
  // and checks as usual otherwise; the CPU backend always checks.
  bool slots_unchanged = false;
};

// A batch of requests for attention. Request b has seq_len[b] tokens in all (cached + new);
// its q_len[b] = cu_seqlens_q[b+1] - cu_seqlens_q[b] new tokens are the last ones, and new token
// i sits at position seq_len[b] - q_len[b] + i (the causal rule: it sees keys at positions <= its
// own; AttentionParams::causal = false lifts it). Slots of request b's tokens:
// req_to_token[req_index[b] * max_len + position].
struct AttentionBatch {
  int num_requests = 0;                   // B
  const int32_t* seq_len = nullptr;       // [B]
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1], cu_seqlens_q[0] == 0
  const int32_t* req_index = nullptr;     // [B] row of req_to_token, in [0, max_requests)
  const int32_t* req_to_token = nullptr;  // [max_requests, max_len] slot indices
  int max_requests = 0;                   // rows of req_to_token
  int max_len = 0;                        // row stride of req_to_token
  // Host-side facts for launch configuration (the CUDA backend cannot read the arrays above
  // without a copy): total new tokens, the largest q_len and the largest seq_len in the batch.
  int64_t total_q = 0;
  int max_q_len = 0;
  int max_seq_len = 0;
  // Optional, decode only: [B] a permutation of the requests, in which the decode kernels take
  // them (decode_order_longest_first makes one from the host's seq_len). Only the speed depends
  // on it: a batch of mixed lengths keeps every SM busy to the end when its longest requests go
  // first. Made once a step, it serves every layer. An entry outside [0, B) is refused (on the
  // device: at the next synchronization), a repeated one is a bad order that the host checks
  // (the CPU backend, and the CUDA backend's batch checks) refuse.
  const int32_t* decode_order = nullptr;
  // Optional, decode only, speed only: true where the caller places each request's keys at
  // positions 64k .. 64k + 63 in consecutive slots (RequestTable's SlotPolicy::kPages, or a table
  // of consecutive slots). Left false (any table: LightLLM's token allocator interleaves the
  // requests of a batch that decodes in steps), a long launch that would leave each SM one CTA
  // takes twice the splits, whose second CTA an SM issues the copies of the scattered rows; with
  // consecutive slots one CTA an SM streams as fast and saves the merge (decode_split.h).
  bool slots_in_pages = false;
};

// The requests' indices longest first (by whole tiles of 64 keys, in buckets of 1/8 of an
// octave; requests in one bucket keep their order): AttentionBatch::decode_order for these
// seq_len.
FP8KV_API std::vector<int32_t> decode_order_longest_first(const int32_t* seq_len, int num_requests);

// Q quantization for fp8-per-head: per (request b, KV head g) scale
// s = amax(|q| over b's new tokens, the Hq/Hkv query heads of g, all D) / 448 (0 -> 1), or the
// static scale of g when static_scale is given (q_calibration: a |q| above 448 * s saturates to
// +-448, as every value does in e4m3(clamp(x / s))).
struct QuantizeQParams {
  const uint16_t* q = nullptr;  // [total_q, Hq, D] bf16
  uint8_t* q_fp8 = nullptr;     // [total_q, Hq, D] e4m3 (out)
  float* q_scale = nullptr;     // [B, Hkv] (out): the scale used for each (request, KV head)
  const float* static_scale = nullptr;  // optional [Hkv]
  // Optional [Hkv]: the running abs-max of Q per KV head (over every request, the group's query
  // heads and all D), updated in place with max(old, |x|) in the same pass, static scale or not;
  // a NaN or infinity in Q makes the entry non-finite. calibrate --q-scales reads it.
  float* observe_amax = nullptr;
  const int32_t* cu_seqlens_q = nullptr;  // [B + 1]
  int num_requests = 0;
  int64_t total_q = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
};

// Attention over the pool (prefill: any q_len; decode: q_len == 1 for every request). q (or
// q_fp8), o and cache.data must start on a 16-byte boundary (refused otherwise): the CUDA kernels
// copy and store them in 16-byte pieces.
struct AttentionParams {
  const uint16_t* q = nullptr;     // [total_q, Hq, D] bf16 (bf16 and fp8-per-tensor)
  const uint8_t* q_fp8 = nullptr;  // [total_q, Hq, D] e4m3 (fp8-per-head; from quantize_q)
  const float* q_scale = nullptr;  // [B, Hkv] (fp8-per-head; from quantize_q)
  uint16_t* o = nullptr;           // [total_q, Hq, D] bf16 (out)
  int num_q_heads = 0;             // Hq, a multiple of cache.num_kv_heads
  KvCacheLayer cache;
  KvLayerScales scales;
  AttentionBatch batch;
  float softmax_scale = 0.0f;  // 0 means 1 / sqrt(D)
  // Prefill's mask. true: new token i of request b sees the keys at positions <= its own
  // (seq_len[b] - q_len[b] + i). false (non-causal): every new token of request b sees all
  // seq_len[b] keys of its request, those after its own position included (an encoder,
  // bidirectional attention, a chunk attending to a whole cached block). Requests never see each
  // other's keys either way. Decode ignores it: its one new token is the last position, so it
  // sees every key under both rules.
  bool causal = true;
  // The KV heads decode plans its split of the KV length for (0: cache.num_kv_heads). A
  // tensor-parallel rank under exact_tp passes the whole model's, so that every request is split
  // as at tp = 1 and the attention output has tp = 1's bits.
  int split_kv_heads = 0;
};

// A tensor, or a slice of one, copied from host memory (a file mapping, say) into backend memory
// and converted on the way: rows [row_begin, + rows) and columns [col_begin, + cols) of the
// row-major host tensor src [src_rows, src_cols] of src_dtype land densely at dst as
// [rows, cols] of dst_dtype. Conversions: the same dtype copies the bytes; F16 -> BF16 rounds to
// nearest even (f16_to_bf16 in fp8.h; the CUDA backend converts on the GPU); anything -> F32 is
// exact; F32 -> BF16 rounds to nearest even. dst_dtype F16 is refused.
struct HostUpload {
  void* dst = nullptr;  // backend memory, [rows, cols] of dst_dtype
  DType dst_dtype = DType::kF32;
  const void* src = nullptr;  // host memory, [src_rows, src_cols] of src_dtype
  DType src_dtype = DType::kF32;
  int64_t src_rows = 0;
  int64_t src_cols = 0;
  int64_t row_begin = 0;
  int64_t rows = 0;
  int64_t col_begin = 0;
  int64_t cols = 0;
};

// Recorded device work (a CUDA graph): the kernels, copies and memsets one sequence of Backend
// and ModelOps calls queued, replayed by launch() on the backend's stream with the very same
// launch configurations and arguments. It reads whatever the recorded pointers hold when it
// runs: the caller writes a step's inputs into the same buffers before each launch, and must
// not launch it once memory it recorded was freed (Backend::memory_epoch). Destroying it waits
// for its launches to finish.
class FP8KV_API StepGraph {
 public:
  virtual ~StepGraph() = default;
  virtual void launch() = 0;
};

class FP8KV_API Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory in the backend's space.
  virtual void* alloc(size_t bytes) = 0;
  virtual void free(void* ptr) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void memset(void* dst, int value, size_t bytes) = 0;
  // Every upload, several at once (worker threads; on the GPU pinned staging buffers and copies
  // overlapped with the packing of the next chunk); returns when all bytes are in place, so the
  // sources may go. Host memory used: the staging buffers only. Throws Error (validate.h) naming
  // the upload and the bad field before anything is copied.
  virtual void upload_tensors(const std::vector<HostUpload>& uploads) = 0;
  // Waits for all queued work; errors detected on the device surface here at the latest.
  virtual void synchronize() = 0;
  // Whether the memory above is CUDA device memory, and the cudaStream_t the work is queued on
  // (null: the default stream). A collective on the backend's buffers queues there.
  virtual bool cuda_memory() const { return false; }
  virtual void* cuda_stream() const { return nullptr; }

  // Recording work into a StepGraph (the CUDA backend; the CPU backend runs everything at once
  // and records nothing). capture_unsupported(): why this backend cannot record now (empty:
  // it can). Between begin_capture() and end_capture() the work queued on the backend's stream
  // (its kernels and the ModelOps on the same stream) is recorded, not run; a call that must
  // synchronize or allocate fails then (throws), and end_capture() returns null with *why
  // saying so. Nothing recorded has run either way. begin_capture throws Error when
  // capture_unsupported() is not empty.
  // records_graphs(): whether the backend records at all (the CUDA backend; the CPU backend
  // never does, and the runner refuses RunnerOptions::cuda_graph on it).
  virtual bool records_graphs() const { return false; }
  virtual std::string capture_unsupported() const {
    return "the " + name() + " backend does not record work into graphs";
  }
  virtual void begin_capture() { throw Error(capture_unsupported()); }
  virtual std::unique_ptr<StepGraph> end_capture(std::string* why) {
    if (why) *why = capture_unsupported();
    return nullptr;
  }
  // Counts the frees of memory that recorded work may point into (free(), a kernel workspace
  // regrown): a StepGraph recorded under another count may read freed memory.
  virtual uint64_t memory_epoch() const { return 0; }
  // An opaque value naming decode_attention's launch configuration for p (on the CUDA backend:
  // the split of the KV length, which follows batch.max_seq_len in steps): two calls with equal
  // keys, shapes and pointers launch the same kernels with the same arguments, so a recorded
  // decode replays correctly for a p of the same key. 0 on backends that record nothing.
  virtual uint64_t decode_launch_key(const AttentionParams& p) const {
    (void)p;
    return 0;
  }

  // Kernels. Each validates its arguments on the host first and throws Error naming the bad
  // argument; nothing is written when a call is refused. quantize_kv's slots live in device
  // memory on the CUDA backend: an out-of-range slot is found there, nothing is written, and
  // the Error is thrown by the next synchronize() or download() rather than by the call itself
  // (no host synchronization per call); the CPU backend throws at once.
  virtual void quantize_kv(const QuantizeKvParams& p) = 0;
  virtual void quantize_q(const QuantizeQParams& p) = 0;
  virtual void prefill_attention(const AttentionParams& p) = 0;
  virtual void decode_attention(const AttentionParams& p) = 0;
};

FP8KV_API std::unique_ptr<Backend> make_cpu_backend();
// Only when built with CUDA (FP8KV_HAVE_CUDA); `stream` is a cudaStream_t or null for the
// default stream. Throws Error when no GPU is usable.
FP8KV_API std::unique_ptr<Backend> make_cuda_backend(int device = 0, void* stream = nullptr);
// The same on a stream of the backend's own (cudaStreamCreate: it still synchronizes with the
// legacy default stream), created and destroyed with the backend; cuda_stream() returns it.
// Recording a StepGraph needs it: the legacy default stream cannot be captured.
FP8KV_API std::unique_ptr<Backend> make_cuda_backend_own_stream(int device = 0);
FP8KV_API bool cuda_available();

}  // namespace fp8kv
