// The Python module fp8kv._fp8kv: the kernels of fp8kv::Backend, the calibration observer, the
// calibration file and the FP8 codecs, over tensors of any framework that speaks DLPack.
//
// Tensors cross without copies: the kernels read and write the producer's own memory. Host
// tensors (NumPy, torch CPU) run on the CPU backend; CUDA tensors on a CUDA backend bound to
// their GPU and to the caller's stream (explicit `stream=`, else torch's current stream for
// that GPU when torch is loaded, else the legacy default stream), with nothing synchronized
// here. Every argument's dtype, shape, strides and device are checked before any kernel runs
// (TypeError for a dtype, ValueError for the rest); the kernels' own refusals (fp8kv::Error)
// arrive as ValueError with the C++ message. The Python package (python/fp8kv/__init__.py)
// adds output allocation and the torch.distributed communicator on top.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/buffer.h"
#include "fp8kv/calib.h"
#include "fp8kv/communicator.h"
#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "fp8kv/kv_pool.h"
#include "fp8kv/observer.h"
#include "fp8kv/scheme.h"
#include "kernels/validate.h"
#include "python/dlpack_tensor.h"

#ifdef FP8KV_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#ifndef FP8KV_VERSION_STRING
#define FP8KV_VERSION_STRING "0.0.0+unknown"
#endif

namespace py = pybind11;

namespace fp8kv::python {
namespace {

// ---- backends --------------------------------------------------------------------------------

// A backend and what the binding keeps next to it: cu_seqlens_q = [0, 1, ..., n] for decode
// calls that give none (in the backend's memory, grown on demand).
struct BackendSlot {
  std::unique_ptr<Backend> backend;
  BackendBuffer arange;  // [arange_n + 1] int32
  int arange_n = -1;
#ifdef FP8KV_HAVE_CUDA
  cudaEvent_t order_event = nullptr;  // orders torch's current stream before this one
#endif
};

BackendSlot& cpu_slot() {
  static BackendSlot* slot = [] {  // never freed: the interpreter may tear modules down in
    auto* s = new BackendSlot;     // any order at exit
    s->backend = make_cpu_backend();
    return s;
  }();
  return *slot;
}

// One CUDA backend per (GPU, stream): a backend queues all its work on one stream.
std::map<std::pair<int, intptr_t>, BackendSlot>& cuda_slots() {
  static auto* slots = new std::map<std::pair<int, intptr_t>, BackendSlot>();
  return *slots;
}

BackendSlot& cuda_slot(int device, intptr_t stream) {
  auto* slots = &cuda_slots();
  auto it = slots->find({device, stream});
  if (it == slots->end()) {
    BackendSlot slot;
    slot.backend = make_cuda_backend(device, reinterpret_cast<void*>(stream));
    it = slots->emplace(std::make_pair(device, stream), std::move(slot)).first;
  }
  return it->second;
}

// Keeps the calling thread's current CUDA device (torch's, usually) across a call: the
// backend selects the tensors' GPU for its own work.
class DeviceGuard {
 public:
#ifdef FP8KV_HAVE_CUDA
  explicit DeviceGuard(bool cuda) {
    if (cuda && cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
#else
  explicit DeviceGuard(bool) {}
#endif
};

// ---- one call: the device and stream of its tensors --------------------------------------------

struct Arg {
  const char* name;
  py::handle obj;  // None: an absent optional argument
};

#ifdef FP8KV_HAVE_CUDA
// The stream of a `stream=` argument: an int (a cudaStream_t) or an object with .cuda_stream
// (torch.cuda.Stream).
intptr_t stream_handle(const py::object& stream) {
  if (PyLong_Check(stream.ptr())) return stream.cast<intptr_t>();
  return stream.attr("cuda_stream").cast<intptr_t>();
}

// torch's current stream on `device`, through torch's C function (torch.cuda.current_stream()
// builds a Stream object in Python: more than a kernel launch costs).
intptr_t torch_current_stream(const TorchHooks& torch, int device) {
  if (torch.current_raw_stream != nullptr) {
    const py::object dev = py::int_(device);
    PyObject* r = PyObject_CallOneArg(torch.current_raw_stream, dev.ptr());
    if (r == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(r).cast<intptr_t>();
  }
  const py::object torch_mod = py::module_::import("torch");
  return torch_mod.attr("cuda").attr("current_stream")(device).attr("cuda_stream").cast<intptr_t>();
}
#endif

class Call {
 public:
  // Inspects every present argument (its device; torch tensors' capsules are taken here), checks
  // that they are on one device and resolves the stream.
  Call(const char* kernel, std::initializer_list<Arg> args, const py::object& stream)
      : kernel_(kernel) {
    if (args.size() > kMaxArgs) throw std::logic_error(std::string(kernel) + ": too many arrays");
    const char* first = nullptr;
    bool any_torch = false;
    for (const Arg& a : args) {
      if (a.obj.is_none()) continue;
      Entry& e = entries_[n_++];
      e.name = a.name;
      e.obj = a.obj.ptr();
      e.arg = Borrowed::inspect(a.obj, a.name);
      any_torch |= e.arg.torch();
      const Device& d = e.arg.device();
      if (first == nullptr) {
        device_ = d;
        first = a.name;
      } else if (!(d == device_)) {
        throw py::value_error(std::string(kernel) + ": " + a.name + " is on " + d.str() + " but " +
                              first + " is on " + device_.str() +
                              ": all tensors of a call must be on one device");
      }
    }
    if (!device_.cuda) return;
#ifndef FP8KV_HAVE_CUDA
    (void)stream;
    throw py::value_error(std::string(kernel) + ": the tensors are on " + device_.str() +
                          " but this fp8kv was built without the CUDA backend");
#else
    const TorchHooks* torch = torch_hooks();
    if (!stream.is_none()) {
      stream_ = stream_handle(stream);
      // Other producers order their pending work before our stream themselves (DLPack calls
      // the legacy default stream 1: 0 is ambiguous there).
      dlpack_stream_ = stream_ == 0 ? 1 : static_cast<int64_t>(stream_);
      // torch tensors came through torch._C._to_dlpack, which orders nothing: their pending work
      // is on torch's current stream, which the call's stream then waits for (once per call;
      // what Tensor.__dlpack__(stream=) does per tensor).
      if (any_torch) {
        const intptr_t current = torch_current_stream(*torch, device_.id);
        if (current != stream_) wait_for_ = current;
      }
    } else if (torch != nullptr) {
      // torch's current stream on the tensors' GPU: the work queues behind the caller's, in
      // order, so the producer needs no synchronization (-1).
      stream_ = torch_current_stream(*torch, device_.id);
      dlpack_stream_ = -1;
    } else {
      stream_ = 0;
      dlpack_stream_ = 1;
    }
#endif
  }

  const Device& device() const { return device_; }
  // The tensor of argument `name` (step 2 of dlpack_tensor.h).
  Tensor borrow(const char* name) const {
    for (int i = 0; i < n_; ++i) {
      if (std::strcmp(entries_[i].name, name) == 0) {
        return entries_[i].arg.borrow(device_, dlpack_stream_);
      }
    }
    throw std::logic_error(std::string(kernel_) + ": argument " + name + " was not inspected");
  }
  // The backend for the call's device and stream; for CUDA tensors from torch on an explicit
  // stream, that stream is made to wait for torch's current one first.
  BackendSlot& slot() const;
  // Host-readable contents (CPU tensors only).
  bool host() const { return !device_.cuda; }
  const char* kernel() const { return kernel_; }

 private:
  struct Entry {
    const char* name = "";
    PyObject* obj = nullptr;
    Borrowed arg;
  };
  static constexpr int kMaxArgs = 11;
  const char* kernel_;
  Entry entries_[kMaxArgs];
  int n_ = 0;
  Device device_;
  intptr_t stream_ = 0;
  std::optional<int64_t> dlpack_stream_;
  std::optional<intptr_t> wait_for_;  // a stream the call's stream must wait for
};

BackendSlot& Call::slot() const {
  if (!device_.cuda) return cpu_slot();
  BackendSlot& slot = cuda_slot(device_.id, stream_);
#ifdef FP8KV_HAVE_CUDA
  if (wait_for_) {
    auto check = [](cudaError_t e, const char* what) {
      if (e != cudaSuccess)
        throw Error(std::string("stream ordering: ") + what + ": " + cudaGetErrorString(e));
    };
    check(cudaSetDevice(device_.id), "cudaSetDevice");
    if (slot.order_event == nullptr) {
      check(cudaEventCreateWithFlags(&slot.order_event, cudaEventDisableTiming), "cudaEventCreate");
    }
    check(cudaEventRecord(slot.order_event, reinterpret_cast<cudaStream_t>(*wait_for_)),
          "cudaEventRecord");
    check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(stream_), slot.order_event, 0),
          "cudaStreamWaitEvent");
  }
#endif
  return slot;
}

[[noreturn]] void refuse(const char* kernel, const std::string& what) {
  throw py::value_error(std::string(kernel) + ": " + what);
}

// An observer's layer argument, within its config's layers (a ValueError that names both).
void check_observer_layer(const Observer& o, int layer) {
  if (layer < 0 || layer >= o.config().num_layers) {
    throw py::value_error("observer: layer " + std::to_string(layer) + " out of range [0, " +
                          std::to_string(o.config().num_layers) + ")");
  }
}

// ---- the kernels -------------------------------------------------------------------------------

// The KV pool of one layer: [num_slots + 1, 2 * Hkv, D], e5m2 for fp8-e5m2, e4m3 for the other
// FP8 schemes, bf16 else.
KvCacheLayer pool_layer(const Call& c, const Tensor& buf, KvScheme scheme) {
  const KvCodec codec = kv_codec(scheme);
  buf.expect(codec == KvCodec::kBf16   ? DType::kBf16
             : codec == KvCodec::kE5m2 ? DType::kE5m2
                                       : DType::kE4m3,
             {-1, -1, -1});
  if (buf.size(0) < 1) {
    refuse(c.kernel(), "kv_buffer: shape " + buf.shape_str() +
                           " has no padding slot: expected [num_slots + 1, 2 * Hkv, D]");
  }
  if (buf.size(1) < 2 || buf.size(1) % 2 != 0) {
    refuse(c.kernel(), "kv_buffer: shape " + buf.shape_str() +
                           ": dimension 1 must be 2 * Hkv (K heads then V heads), even and > 0");
  }
  KvCacheLayer layer;
  layer.data = buf.data();
  layer.num_slots = buf.size(0) - 1;
  layer.num_kv_heads = static_cast<int>(buf.size(1) / 2);
  layer.head_dim = static_cast<int>(buf.size(2));
  layer.scheme = scheme;
  return layer;
}

// K/V scales: per-head [Hkv], per-tensor [1], float32; unused (null) for bf16 and fp8-e5m2,
// which refuses them (its scale is 1).
KvLayerScales layer_scales(const Call& c, const KvCacheLayer& layer, const py::handle& k,
                           const py::handle& v, Tensor& k_t, Tensor& v_t) {
  KvLayerScales s;
  if (!has_kv_scales(layer.scheme)) {
    if (is_fp8(layer.scheme) && (!k.is_none() || !v.is_none())) {
      refuse(c.kernel(), std::string("scheme ") + scheme_name(layer.scheme) +
                             " takes no k_scale / v_scale (its scale is 1)");
    }
    return s;
  }
  if (k.is_none() || v.is_none()) {
    refuse(c.kernel(), std::string("scheme ") + scheme_name(layer.scheme) +
                           " needs k_scale and v_scale (float32 tensors)");
  }
  const int64_t n = kv_scales_per_layer(layer.scheme, layer.num_kv_heads);
  k_t = c.borrow("k_scale");
  k_t.expect(DType::kF32, {n});
  v_t = c.borrow("v_scale");
  v_t.expect(DType::kF32, {n});
  s.k = k_t.as<float>();
  s.v = v_t.as<float>();
  return s;
}

void quantize_kv(const py::handle& kv, const py::handle& slots, const py::handle& kv_buffer,
                 const std::string& scheme_text, const py::handle& k_scale,
                 const py::handle& v_scale, const py::handle& amax, const py::object& stream) {
  const KvScheme scheme = parse_scheme(scheme_text);
  Call c("quantize_kv",
         {{"kv", kv},
          {"slots", slots},
          {"kv_buffer", kv_buffer},
          {"k_scale", k_scale},
          {"v_scale", v_scale},
          {"amax", amax}},
         stream);
  const Tensor buf = c.borrow("kv_buffer");
  QuantizeKvParams p;
  p.cache = pool_layer(c, buf, scheme);
  const int64_t two_h = 2 * p.cache.num_kv_heads;
  const Tensor x = c.borrow("kv");
  x.expect(DType::kBf16, {-1, two_h, p.cache.head_dim});
  const Tensor s = c.borrow("slots");
  s.expect(DType::kI32, {x.size(0)});
  Tensor k_t, v_t, a_t;
  p.scales = layer_scales(c, p.cache, k_scale, v_scale, k_t, v_t);
  if (!amax.is_none()) {
    a_t = c.borrow("amax");
    a_t.expect(DType::kF32, {two_h});
    p.observe_amax = a_t.as<float>();
  }
  p.kv = x.as<uint16_t>();
  p.slots = s.as<int32_t>();
  p.num_tokens = x.size(0);
  BackendSlot& slot = c.slot();
  DeviceGuard guard(c.device().cuda);
  py::gil_scoped_release nogil;
  slot.backend->quantize_kv(p);
}

void quantize_q(const py::handle& q, const py::handle& cu_seqlens_q, const py::handle& q_fp8,
                const py::handle& q_scale, const py::handle& static_scale, const py::handle& amax,
                const py::object& stream) {
  Call c("quantize_q",
         {{"q", q},
          {"cu_seqlens_q", cu_seqlens_q},
          {"q_fp8", q_fp8},
          {"q_scale", q_scale},
          {"static_scale", static_scale},
          {"amax", amax}},
         stream);
  const Tensor qs = c.borrow("q_scale");
  qs.expect(DType::kF32, {-1, -1});
  const Tensor x = c.borrow("q");
  x.expect(DType::kBf16, {-1, -1, -1});
  const Tensor out = c.borrow("q_fp8");
  out.expect_like(DType::kE4m3, x);
  const Tensor cu = c.borrow("cu_seqlens_q");
  cu.expect(DType::kI32, {qs.size(0) + 1});
  Tensor st;
  QuantizeQParams p;
  if (!static_scale.is_none()) {
    st = c.borrow("static_scale");
    st.expect(DType::kF32, {qs.size(1)});
    p.static_scale = st.as<float>();
  }
  Tensor a_t;
  if (!amax.is_none()) {
    a_t = c.borrow("amax");
    a_t.expect(DType::kF32, {qs.size(1)});
    p.observe_amax = a_t.as<float>();
  }
  p.q = x.as<uint16_t>();
  p.q_fp8 = out.as<uint8_t>();
  p.q_scale = qs.as<float>();
  p.cu_seqlens_q = cu.as<int32_t>();
  p.num_requests = static_cast<int>(qs.size(0));
  p.total_q = x.size(0);
  p.num_q_heads = static_cast<int>(x.size(1));
  p.num_kv_heads = static_cast<int>(qs.size(1));
  p.head_dim = static_cast<int>(x.size(2));
  BackendSlot& slot = c.slot();
  DeviceGuard guard(c.device().cuda);
  py::gil_scoped_release nogil;
  slot.backend->quantize_q(p);
}

// cu_seqlens_q = [0, 1, ..., n] in the backend's memory, for decode calls that give none.
const int32_t* arange(BackendSlot& slot, int n) {
  if (slot.arange_n < n) {
    const int grown = std::max(n, 2 * slot.arange_n);
    std::vector<int32_t> host(static_cast<size_t>(grown) + 1);
    for (int i = 0; i <= grown; ++i) host[i] = i;
    // Queued work may still read the old buffer: the backend frees it in stream order only for
    // CUDA's caching allocators, so wait for it first (once per growth, never on the hot path).
    if (!slot.arange.empty()) slot.backend->synchronize();
    slot.arange = BackendBuffer(*slot.backend, host);
    slot.arange_n = grown;
  }
  return slot.arange.as<int32_t>();
}

void attention(AttentionPhase phase, const py::handle& q, const py::handle& kv_buffer,
               const py::handle& req_to_token, const py::handle& b_req_idx,
               const py::handle& b_seq_len, const py::handle& cu_seqlens_q, const py::handle& out,
               const std::string& scheme_text, const py::handle& k_scale, const py::handle& v_scale,
               const py::handle& q_scale, std::optional<int> max_q_len,
               std::optional<int> max_seq_len, float softmax_scale, int split_kv_heads,
               const py::object& stream, int repeat = 1, bool causal = true,
               const py::handle& decode_order = py::none(), bool slots_in_pages = false) {
  const char* kernel = attention_phase_name(phase);
  const KvScheme scheme = parse_scheme(scheme_text);
  Call c(kernel,
         {{"q", q},
          {"kv_buffer", kv_buffer},
          {"req_to_token", req_to_token},
          {"b_req_idx", b_req_idx},
          {"b_seq_len", b_seq_len},
          {"cu_seqlens_q", cu_seqlens_q},
          {"out", out},
          {"k_scale", k_scale},
          {"v_scale", v_scale},
          {"q_scale", q_scale},
          {"decode_order", decode_order}},
         stream);
  const Tensor buf = c.borrow("kv_buffer");
  AttentionParams p;
  p.cache = pool_layer(c, buf, scheme);
  const bool q_fp8 = fp8_q(scheme);
  const Tensor x = c.borrow("q");
  x.expect(q_fp8 ? DType::kE4m3 : DType::kBf16, {-1, -1, p.cache.head_dim});
  const Tensor o = c.borrow("out");
  o.expect_like(DType::kBf16, x);
  const Tensor seq = c.borrow("b_seq_len");
  seq.expect(DType::kI32, {-1});
  const int64_t B = seq.size(0);
  const Tensor req = c.borrow("b_req_idx");
  req.expect(DType::kI32, {B});
  const Tensor table = c.borrow("req_to_token");
  table.expect(DType::kI32, {-1, -1});
  Tensor cu, qs, k_t, v_t, order;
  if (!decode_order.is_none()) {
    order = c.borrow("decode_order");
    order.expect(DType::kI32, {B});
  }
  const int32_t* cu_ptr = nullptr;
  if (!cu_seqlens_q.is_none()) {
    cu = c.borrow("cu_seqlens_q");
    cu.expect(DType::kI32, {B + 1});
    cu_ptr = cu.as<int32_t>();
  } else if (phase != AttentionPhase::kDecode) {
    refuse(kernel, "cu_seqlens_q is required");
  } else if (B != x.size(0)) {
    refuse(kernel, "q: " + std::to_string(x.size(0)) + " rows for " + std::to_string(B) +
                       " requests: decode takes exactly one new token per request");
  }
  if (q_fp8) {
    if (q_scale.is_none()) {
      refuse(kernel, "scheme fp8-per-head needs q_scale [B, Hkv] (from quantize_q)");
    }
    qs = c.borrow("q_scale");
    qs.expect(DType::kF32, {B, p.cache.num_kv_heads});
    p.q_fp8 = x.as<uint8_t>();
    p.q_scale = qs.as<float>();
  } else {
    p.q = x.as<uint16_t>();
  }
  p.scales = layer_scales(c, p.cache, k_scale, v_scale, k_t, v_t);
  p.o = o.as<uint16_t>();
  p.num_q_heads = static_cast<int>(x.size(1));
  p.softmax_scale = softmax_scale;
  p.split_kv_heads = split_kv_heads;
  p.causal = causal;  // prefill's mask; decode ignores it

  AttentionBatch& b = p.batch;
  b.num_requests = static_cast<int>(B);
  b.seq_len = seq.as<int32_t>();
  b.req_index = req.as<int32_t>();
  b.req_to_token = table.as<int32_t>();
  b.max_requests = static_cast<int>(table.size(0));
  b.max_len = static_cast<int>(table.size(1));
  b.total_q = x.size(0);
  // Host-side facts: given, or read from host tensors; reading device tensors would synchronize.
  if (c.host()) {
    for (int64_t i = 0; i < B; ++i) {
      if (b.req_index[i] < 0 || b.req_index[i] >= table.size(0)) {
        refuse(kernel, "b_req_idx[" + std::to_string(i) + "] = " + std::to_string(b.req_index[i]) +
                           " out of [0, max_requests " + std::to_string(table.size(0)) + ")");
      }
    }
  }
  if (phase == AttentionPhase::kDecode) {
    if (max_q_len && *max_q_len != 1) {
      refuse(kernel, "max_q_len " + std::to_string(*max_q_len) + ": decode takes q_len 1");
    }
    b.max_q_len = 1;
  } else if (max_q_len) {
    b.max_q_len = *max_q_len;
  } else if (c.host()) {
    for (int64_t i = 0; i < B; ++i) b.max_q_len = std::max(b.max_q_len, cu_ptr[i + 1] - cu_ptr[i]);
  } else {
    refuse(kernel,
           "max_q_len is required for CUDA tensors (reading cu_seqlens_q would "
           "synchronize the device)");
  }
  if (max_seq_len) {
    b.max_seq_len = *max_seq_len;
  } else if (c.host()) {
    for (int64_t i = 0; i < B; ++i) b.max_seq_len = std::max(b.max_seq_len, b.seq_len[i]);
  } else {
    refuse(kernel,
           "max_seq_len is required for CUDA tensors (reading b_seq_len would "
           "synchronize the device)");
  }
  if (B <= 0) refuse(kernel, "empty batch: b_seq_len has 0 requests");

  BackendSlot& slot = c.slot();
  DeviceGuard guard(c.device().cuda);
  std::vector<int32_t> host_arange;
  if (cu_ptr == nullptr) {
    if (c.host()) {
      host_arange.resize(static_cast<size_t>(B) + 1);
      for (int64_t i = 0; i <= B; ++i) host_arange[i] = static_cast<int32_t>(i);
      cu_ptr = host_arange.data();
    } else {
      cu_ptr = arange(slot, static_cast<int>(B));
    }
  }
  b.cu_seqlens_q = cu_ptr;
  if (!decode_order.is_none()) b.decode_order = order.as<int32_t>();
  b.slots_in_pages = slots_in_pages;
  py::gil_scoped_release nogil;
  for (int i = 0; i < repeat; ++i) {  // repeat > 1: the C++ side of scripts/bench_python.py
    if (phase == AttentionPhase::kDecode) {
      slot.backend->decode_attention(p);
    } else {
      slot.backend->prefill_attention(p);
    }
  }
}

// Waits for the CUDA work fp8kv queued (every stream, or those of `device` / `stream`) and throws
// the first refusal a kernel recorded on the device since the last check (backend synchronize()).
void synchronize(std::optional<int> device, const py::object& stream) {
#ifdef FP8KV_HAVE_CUDA
  std::optional<intptr_t> only;
  if (!stream.is_none()) only = stream_handle(stream);
  for (auto& [key, slot] : cuda_slots()) {
    if ((device && key.first != *device) || (only && key.second != *only)) continue;
    DeviceGuard guard(true);
    py::gil_scoped_release nogil;
    slot.backend->synchronize();
  }
#else
  (void)device;
  (void)stream;
#endif
}

// ---- codecs ------------------------------------------------------------------------------------

// out[i] = f(in[i]) over host arrays; `out` allocated as a NumPy array when not given.
template <class In, class Out, class F>
py::object codec(const char* name, const py::handle& in, DType in_type, const py::handle& out,
                 DType out_type, F f) {
  Call c(name, {{"x", in}, {"out", out}}, py::none());
  if (c.device().cuda) refuse(name, "the codecs take host arrays (NumPy, torch CPU tensors)");
  const Tensor x = c.borrow("x");
  x.expect_any_shape(in_type);
  py::object result;
  Out* dst = nullptr;
  Tensor o;
  if (out.is_none()) {
    py::array_t<Out> a(x.shape());
    dst = a.mutable_data();
    result = std::move(a);
  } else {
    o = c.borrow("out");
    o.expect_like(out_type, x);
    dst = o.as<Out>();
    result = py::reinterpret_borrow<py::object>(out);
  }
  const In* src = x.as<In>();
  const int64_t n = x.numel();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < n; ++i) dst[i] = f(src[i]);
  }
  return result;
}

// ---- calibration -------------------------------------------------------------------------------

QuantType parse_quant_type(const std::string& text) {
  if (text == "per_head" || text == "per-head" || text == "fp8-per-head" ||
      text == "fp8-per-head-bf16q") {
    return QuantType::kPerHead;
  }
  if (text == "per_tensor" || text == "per-tensor" || text == "fp8-per-tensor") {
    return QuantType::kPerTensor;
  }
  throw py::value_error("scheme '" + text +
                        "' has no calibration: expected per-head or per-tensor (also per_head, "
                        "fp8-per-head, fp8-per-head-bf16q, per_tensor, fp8-per-tensor; bf16 and "
                        "fp8-e5m2 take no scales)");
}

py::array_t<float> table(const std::vector<float>& v, int rows, int cols) {
  py::array_t<float> a({rows, cols});
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(float));
  return a;
}

std::vector<float> flat(const py::handle& obj, const char* name) {
  auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a) throw py::type_error(std::string(name) + ": expected an array of float32 values");
  return {a.data(), a.data() + a.size()};
}

// Tensor-parallel collectives through a Python object with rank(), world_size(), all_gather(x)
// and all_reduce_max(x) on float32 NumPy arrays (fp8kv.TorchDistributedCommunicator is one).
class PyCommunicator final : public Communicator {
 public:
  explicit PyCommunicator(py::object obj) : obj_(std::move(obj)) {}
  int rank() const override { return obj_.attr("rank")().cast<int>(); }
  int world_size() const override { return obj_.attr("world_size")().cast<int>(); }
  void all_gather(const float* in, float* out, size_t count) override {
    call("all_gather", in, out, count, count * world_size());
  }
  void all_reduce_max(float* buf, size_t count) override {
    call("all_reduce_max", buf, buf, count, count);
  }
  void all_reduce_sum(float* buf, size_t count) override {
    call("all_reduce_sum", buf, buf, count, count);
  }

 private:
  void call(const char* method, const float* in, float* out, size_t count, size_t want) {
    py::array_t<float> a(static_cast<py::ssize_t>(count));
    if (count) std::memcpy(a.mutable_data(), in, count * sizeof(float));
    const py::object r = obj_.attr(method)(a);
    auto res = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(r);
    if (!res || static_cast<size_t>(res.size()) != want) {
      throw py::value_error(std::string("communicator.") + method + " returned " +
                            (res ? std::to_string(res.size()) : std::string("no array of")) +
                            " values, expected " + std::to_string(want));
    }
    if (want) std::memcpy(out, res.data(), want * sizeof(float));
  }
  py::object obj_;
};

// A host array of int32 (converted from any integer array NumPy can cast).
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// The length of a 1-D array argument `name` of `fn`; ValueError for another rank.
int64_t vector_length(const char* fn, const char* name, const IntArray& a) {
  if (a.ndim() != 1) {
    throw py::value_error(std::string(fn) + ": " + name + " must be 1-D, got " +
                          std::to_string(a.ndim()) + " dimensions");
  }
  return static_cast<int64_t>(a.size());
}

}  // namespace
}  // namespace fp8kv::python

PYBIND11_MODULE(_fp8kv, m) {
  using namespace fp8kv;
  using namespace fp8kv::python;
  using fp8kv::python::DType;  // not fp8kv::DType (safetensors element types)
  m.doc() = "fp8kv kernels, observer, calibration file and codecs over DLPack (see fp8kv).";
  m.attr("__version__") = FP8KV_VERSION_STRING;
  py::register_exception_translator([](std::exception_ptr e) {
    try {
      if (e) std::rethrow_exception(e);
    } catch (const fp8kv::Error& err) {
      PyErr_SetString(PyExc_ValueError, err.what());
    }
  });
  m.def("cuda_available", &cuda_available,
        "Whether the CUDA backend is built in and a GPU usable.");
  m.def("synchronize", &synchronize, py::arg("device") = py::none(),
        py::arg("stream") = py::none());

  m.def("quantize_kv", &quantize_kv, py::arg("kv"), py::arg("slots"), py::arg("kv_buffer"),
        py::arg("scheme"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
        py::arg("amax") = py::none(), py::arg("stream") = py::none());
  m.def("quantize_q", &quantize_q, py::arg("q"), py::arg("cu_seqlens_q"), py::arg("q_fp8"),
        py::arg("q_scale"), py::arg("static_scale") = py::none(), py::arg("amax") = py::none(),
        py::arg("stream") = py::none());
  m.def(
      "prefill_attention",
      [](py::handle q, py::handle kv_buffer, py::handle req_to_token, py::handle b_req_idx,
         py::handle b_seq_len, py::handle cu_seqlens_q, py::handle out, const std::string& scheme,
         py::handle k_scale, py::handle v_scale, py::handle q_scale, std::optional<int> max_q_len,
         std::optional<int> max_seq_len, float softmax_scale, int split_kv_heads, py::object stream,
         bool causal) {
        attention(AttentionPhase::kPrefill, q, kv_buffer, req_to_token, b_req_idx, b_seq_len,
                  cu_seqlens_q, out, scheme, k_scale, v_scale, q_scale, max_q_len, max_seq_len,
                  softmax_scale, split_kv_heads, stream, /*repeat=*/1, causal);
      },
      py::arg("q"), py::arg("kv_buffer"), py::arg("req_to_token"), py::arg("b_req_idx"),
      py::arg("b_seq_len"), py::arg("cu_seqlens_q"), py::arg("out"), py::arg("scheme"),
      py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none(),
      py::arg("q_scale") = py::none(), py::arg("max_q_len") = py::none(),
      py::arg("max_seq_len") = py::none(), py::arg("softmax_scale") = 0.0f,
      py::arg("split_kv_heads") = 0, py::arg("stream") = py::none(), py::arg("causal") = true);
  m.def(
      "decode_attention",
      [](py::handle q, py::handle kv_buffer, py::handle req_to_token, py::handle b_req_idx,
         py::handle b_seq_len, py::handle out, const std::string& scheme, py::handle k_scale,
         py::handle v_scale, py::handle q_scale, std::optional<int> max_seq_len,
         py::handle cu_seqlens_q, float softmax_scale, int split_kv_heads, py::object stream,
         int repeat, py::handle decode_order, bool slots_in_pages) {
        attention(AttentionPhase::kDecode, q, kv_buffer, req_to_token, b_req_idx, b_seq_len,
                  cu_seqlens_q, out, scheme, k_scale, v_scale, q_scale, std::nullopt, max_seq_len,
                  softmax_scale, split_kv_heads, stream, repeat, true, decode_order,
                  slots_in_pages);
      },
      py::arg("q"), py::arg("kv_buffer"), py::arg("req_to_token"), py::arg("b_req_idx"),
      py::arg("b_seq_len"), py::arg("out"), py::arg("scheme"), py::arg("k_scale") = py::none(),
      py::arg("v_scale") = py::none(), py::arg("q_scale") = py::none(),
      py::arg("max_seq_len") = py::none(), py::arg("cu_seqlens_q") = py::none(),
      py::arg("softmax_scale") = 0.0f, py::arg("split_kv_heads") = 0,
      py::arg("stream") = py::none(), py::arg("_repeat") = 1, py::arg("decode_order") = py::none(),
      py::arg("slots_in_pages") = false);
  m.def(
      "decode_order_longest_first",
      [](const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& seq_len) {
        if (seq_len.ndim() != 1) {
          throw py::value_error("decode_order_longest_first: b_seq_len must be 1-D, got " +
                                std::to_string(seq_len.ndim()) + " dimensions");
        }
        const std::vector<int32_t> order =
            decode_order_longest_first(seq_len.data(), static_cast<int>(seq_len.size()));
        return py::array_t<int32_t>(static_cast<py::ssize_t>(order.size()), order.data());
      },
      py::arg("b_seq_len"));

  // The pool's slot allocator (host): pages of 64 slots per request window, or LightLLM's token
  // order (fp8kv/kv_pool.h).
  py::class_<SlotAllocator>(m, "SlotAllocator")
      .def(py::init([](int64_t num_slots, const std::string& policy) {
             if (policy != "pages" && policy != "tokens") {
               throw py::value_error("SlotAllocator: policy must be 'pages' or 'tokens', got '" +
                                     policy + "'");
             }
             return std::make_unique<SlotAllocator>(
                 num_slots, policy == "pages" ? SlotPolicy::kPages : SlotPolicy::kTokens);
           }),
           py::arg("num_slots"), py::arg("policy") = "pages")
      .def_property_readonly("num_slots", &SlotAllocator::num_slots)
      .def_property_readonly("free_slots", &SlotAllocator::free_slots)
      .def_property_readonly("policy",
                             [](const SlotAllocator& a) {
                               return a.policy() == SlotPolicy::kPages ? "pages" : "tokens";
                             })
      .def(
          "take",
          [](SlotAllocator& a, const IntArray& start, const IntArray& last_slot,
             const IntArray& count) {
            const char* fn = "SlotAllocator.take";
            const int64_t n = vector_length(fn, "start", start);
            if (vector_length(fn, "last_slot", last_slot) != n ||
                vector_length(fn, "count", count) != n) {
              throw py::value_error(std::string(fn) +
                                    ": start, last_slot and count differ in length (" +
                                    std::to_string(n) + ", " + std::to_string(last_slot.size()) +
                                    ", " + std::to_string(count.size()) + ")");
            }
            int64_t needed = 0;
            for (int64_t b = 0; b < n; ++b) {
              if (start.data()[b] < 0 || count.data()[b] < 0 || last_slot.data()[b] < -1 ||
                  last_slot.data()[b] >= a.num_slots() ||
                  int64_t{start.data()[b]} + count.data()[b] > INT32_MAX) {
                throw py::value_error(std::string(fn) + ": entry " + std::to_string(b) +
                                      " has start " + std::to_string(start.data()[b]) +
                                      ", last_slot " + std::to_string(last_slot.data()[b]) +
                                      ", count " + std::to_string(count.data()[b]) +
                                      " (start, count >= 0, start + count < 2^31; last_slot -1 "
                                      "or a slot of the pool)");
              }
              needed += count.data()[b];
            }
            if (needed > a.free_slots()) {  // all or nothing
              throw py::value_error(std::string(fn) + ": out of KV cache slots: needs " +
                                    std::to_string(needed) + " new slots, " +
                                    std::to_string(a.free_slots()) + " of " +
                                    std::to_string(a.num_slots()) + " are free");
            }
            py::array_t<int32_t> out(static_cast<py::ssize_t>(needed));
            int32_t* o = out.mutable_data();
            for (int64_t b = 0; b < n; ++b) {
              int32_t prev = last_slot.data()[b];
              for (int32_t i = 0; i < count.data()[b]; ++i) {
                prev = a.take(start.data()[b] + i, prev);
                *o++ = prev;
              }
            }
            return out;
          },
          py::arg("start"), py::arg("last_slot"), py::arg("count"))
      .def(
          "give_back",
          [](SlotAllocator& a, const IntArray& slots) {
            const int64_t n = vector_length("SlotAllocator.give_back", "slots", slots);
            std::vector<int32_t> sorted(slots.data(), slots.data() + n);
            std::sort(sorted.begin(), sorted.end());
            for (int64_t i = 0; i < n; ++i) {  // all checked before any is freed
              const int32_t s = sorted[static_cast<size_t>(i)];
              if (!a.is_free(s) && s >= 0 && s < a.num_slots() &&
                  (i == 0 || sorted[static_cast<size_t>(i) - 1] != s)) {
                continue;
              }
              throw py::value_error("SlotAllocator.give_back: slot " + std::to_string(s) +
                                    (s < 0 || s >= a.num_slots() ? " is outside the pool of " +
                                                                       std::to_string(a.num_slots())
                                     : a.is_free(s) ? std::string(" is free already")
                                                    : std::string(" appears twice")));
            }
            for (int64_t i = 0; i < n; ++i) a.give_back(slots.data()[i]);
          },
          py::arg("slots"));

  // Codecs (host arrays).
  m.def(
      "encode_e4m3",
      [](py::handle x, py::handle out) {
        return codec<float, uint8_t>("encode_e4m3", x, DType::kF32, out, DType::kU8,
                                     [](float v) { return float_to_e4m3(v); });
      },
      py::arg("x"), py::arg("out") = py::none());
  m.def(
      "decode_e4m3",
      [](py::handle x, py::handle out) {
        return codec<uint8_t, float>("decode_e4m3", x, DType::kE4m3, out, DType::kF32,
                                     [](uint8_t v) { return e4m3_to_float(v); });
      },
      py::arg("codes"), py::arg("out") = py::none());
  m.def(
      "encode_e5m2",
      [](py::handle x, py::handle out) {
        return codec<float, uint8_t>("encode_e5m2", x, DType::kF32, out, DType::kU8,
                                     [](float v) { return float_to_e5m2(v); });
      },
      py::arg("x"), py::arg("out") = py::none());
  m.def(
      "decode_e5m2",
      [](py::handle x, py::handle out) {
        return codec<uint8_t, float>("decode_e5m2", x, DType::kE5m2, out, DType::kF32,
                                     [](uint8_t v) { return e5m2_to_float(v); });
      },
      py::arg("codes"), py::arg("out") = py::none());
  m.def(
      "encode_bf16",
      [](py::handle x, py::handle out) {
        return codec<float, uint16_t>("encode_bf16", x, DType::kF32, out, DType::kBf16,
                                      [](float v) { return float_to_bf16(v); });
      },
      py::arg("x"), py::arg("out") = py::none());
  m.def(
      "decode_bf16",
      [](py::handle x, py::handle out) {
        return codec<uint16_t, float>("decode_bf16", x, DType::kBf16, out, DType::kF32,
                                      [](uint16_t v) { return bf16_to_float(v); });
      },
      py::arg("bits"), py::arg("out") = py::none());

  // Observer.
  py::class_<Observer>(m, "Observer")
      .def(py::init([](int num_layers, int num_kv_heads, const std::string& scheme, int warmup,
                       int count, int total_kv_heads) {
             ObserverConfig cfg;
             cfg.num_layers = num_layers;
             cfg.num_kv_heads = num_kv_heads;
             cfg.total_kv_heads = total_kv_heads;
             cfg.quant_type = parse_quant_type(scheme);
             cfg.warmup = warmup;
             cfg.count = count;
             return std::make_unique<Observer>(cfg);
           }),
           py::arg("num_layers"), py::arg("num_kv_heads"), py::arg("scheme") = "per-head",
           py::arg("warmup") = 0, py::arg("count") = 4000, py::arg("total_kv_heads") = 0)
      .def_property_readonly("num_layers", [](const Observer& o) { return o.config().num_layers; })
      .def_property_readonly("num_kv_heads",
                             [](const Observer& o) { return o.config().num_kv_heads; })
      .def_property_readonly(
          "scheme",
          [](const Observer& o) { return std::string(quant_type_name(o.config().quant_type)); })
      .def_property_readonly("warmup", [](const Observer& o) { return o.config().warmup; })
      .def_property_readonly("count", [](const Observer& o) { return o.config().count; })
      .def(
          "observe",
          [](Observer& o, int layer, py::handle amax) {
            Call c("observe", {{"amax", amax}}, py::none());
            if (c.device().cuda) {
              refuse("observe", "amax is on " + c.device().str() +
                                    ": the observer takes host arrays (pass amax.cpu())");
            }
            const Tensor a = c.borrow("amax");
            a.expect(DType::kF32, {2 * static_cast<int64_t>(o.config().num_kv_heads)});
            o.record(layer, a.as<float>());
          },
          py::arg("layer"), py::arg("amax"))
      .def(
          "wants",
          [](const Observer& o, int layer) {
            check_observer_layer(o, layer);
            return o.wants(layer);
          },
          py::arg("layer"))
      .def("done", &Observer::done)
      .def(
          "passes_seen",
          [](const Observer& o, int layer) {
            check_observer_layer(o, layer);
            return o.passes_seen(layer);
          },
          py::arg("layer"))
      .def(
          "_finalize",
          [](const Observer& o, py::object communicator, const std::string& architectures) {
            if (communicator.is_none()) {
              auto single = make_single_communicator();
              return o.finalize(*single, architectures);
            }
            PyCommunicator comm(std::move(communicator));
            return o.finalize(comm, architectures);
          },
          py::arg("communicator"), py::arg("architectures"));

  // Calibration file.
  py::class_<CalibData>(m, "CalibData")
      .def(
          py::init([](const std::string& architectures, const std::string& quant_type,
                      int num_layers, int num_head, py::object scales, const std::string& version) {
            CalibData d;
            d.architectures = architectures;
            d.quant_type = parse_quant_type(quant_type);
            d.num_layers = num_layers;
            d.num_head = num_head;
            d.version = version;
            if (!scales.is_none()) d.scales = flat(scales, "scales");
            return d;
          }),
          py::arg("architectures") = "", py::arg("quant_type") = "per_head",
          py::arg("num_layers") = 0, py::arg("num_head") = 0, py::arg("scales") = py::none(),
          py::arg("version") = "1.0")
      .def_readwrite("version", &CalibData::version)
      .def_readwrite("architectures", &CalibData::architectures)
      .def_property(
          "quant_type",
          [](const CalibData& d) { return std::string(quant_type_name(d.quant_type)); },
          [](CalibData& d, const std::string& t) { d.quant_type = parse_quant_type(t); })
      .def_readwrite("qmin", &CalibData::qmin)
      .def_readwrite("qmax", &CalibData::qmax)
      .def_readwrite("num_layers", &CalibData::num_layers)
      .def_readwrite("num_head", &CalibData::num_head)
      .def_readwrite("num_target_layers", &CalibData::num_target_layers)
      .def_readwrite("num_draft_layers", &CalibData::num_draft_layers)
      .def_property(
          "scales",
          [](const CalibData& d) {
            const int w = d.row_width();
            if (d.num_layers <= 0 || static_cast<size_t>(d.num_layers) * w != d.scales.size()) {
              return py::array_t<float>(static_cast<py::ssize_t>(d.scales.size()), d.scales.data());
            }
            return table(d.scales, d.num_layers, w);
          },
          [](CalibData& d, py::handle v) { d.scales = flat(v, "scales"); })
      .def_property(
          "q_scales",
          [](const CalibData& d) -> py::object {
            if (!d.q_scales) return py::none();
            const int h = d.q_scales->num_head;
            const int rows = h > 0 ? static_cast<int>(d.q_scales->scales.size()) / h : 0;
            return table(d.q_scales->scales, rows, h);
          },
          [](CalibData& d, py::handle v) {
            if (v.is_none()) {
              d.q_scales.reset();
              return;
            }
            auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(v);
            if (!a || a.ndim() != 2) {
              throw py::value_error("q_scales: expected a [num_layers, num_head] float array");
            }
            QScales q;
            q.num_head = static_cast<int>(a.shape(1));
            q.scales.assign(a.data(), a.data() + a.size());
            d.q_scales = std::move(q);
          })
      .def("k_scale", &CalibData::k_scale, py::arg("layer"), py::arg("head") = 0)
      .def("v_scale", &CalibData::v_scale, py::arg("layer"), py::arg("head") = 0)
      .def("to_json", [](const CalibData& d) { return calib_to_json(d); })
      .def("__repr__", [](const CalibData& d) {
        return "CalibData(architectures='" + d.architectures + "', quant_type='" +
               quant_type_name(d.quant_type) + "', num_layers=" + std::to_string(d.num_layers) +
               ", num_head=" + std::to_string(d.num_head) + ")";
      });

  py::class_<RankScales>(m, "RankScales")
      .def_property_readonly(
          "quant_type",
          [](const RankScales& r) { return std::string(quant_type_name(r.quant_type)); })
      .def_readonly("num_layers", &RankScales::num_layers)
      .def_readonly("heads_per_rank", &RankScales::heads_per_rank)
      .def_readonly("broadcast_from_per_tensor", &RankScales::broadcast_from_per_tensor)
      .def_property_readonly(
          "kv", [](const RankScales& r) { return table(r.kv, r.num_layers, r.row_width()); })
      .def_property_readonly("q",
                             [](const RankScales& r) -> py::object {
                               if (!r.q) return py::none();
                               return table(*r.q, r.num_layers, r.heads_per_rank);
                             })
      .def(
          "k",
          [](const RankScales& r, int layer) {
            if (layer < 0 || layer >= r.num_layers) {
              throw py::value_error("layer " + std::to_string(layer) + " out of range [0, " +
                                    std::to_string(r.num_layers) + ")");
            }
            return py::array_t<float>(r.row_width() / 2, r.k_row(layer));
          },
          py::arg("layer"))
      .def(
          "v",
          [](const RankScales& r, int layer) {
            if (layer < 0 || layer >= r.num_layers) {
              throw py::value_error("layer " + std::to_string(layer) + " out of range [0, " +
                                    std::to_string(r.num_layers) + ")");
            }
            return py::array_t<float>(r.row_width() / 2, r.v_row(layer));
          },
          py::arg("layer"));

  auto expect_of = [](std::optional<std::string> arch, std::optional<int> num_layers,
                      std::optional<int> num_kv_heads, std::optional<std::string> scheme) {
    CalibExpect e;
    e.architectures = std::move(arch);
    e.num_layers = num_layers;
    e.num_kv_heads = num_kv_heads;
    if (scheme) e.quant_type = parse_quant_type(*scheme);
    return e;
  };
  m.def(
      "load_calib",
      [expect_of](const std::string& path, std::optional<std::string> arch,
                  std::optional<int> num_layers, std::optional<int> num_kv_heads,
                  std::optional<std::string> scheme) {
        return load_calib(path,
                          expect_of(std::move(arch), num_layers, num_kv_heads, std::move(scheme)));
      },
      py::arg("path"), py::arg("arch") = py::none(), py::arg("num_layers") = py::none(),
      py::arg("num_kv_heads") = py::none(), py::arg("scheme") = py::none());
  m.def(
      "parse_calib",
      [expect_of](const std::string& text, const std::string& name, std::optional<std::string> arch,
                  std::optional<int> num_layers, std::optional<int> num_kv_heads,
                  std::optional<std::string> scheme) {
        return parse_calib(text, name,
                           expect_of(std::move(arch), num_layers, num_kv_heads, std::move(scheme)));
      },
      py::arg("text"), py::arg("name") = "<string>", py::arg("arch") = py::none(),
      py::arg("num_layers") = py::none(), py::arg("num_kv_heads") = py::none(),
      py::arg("scheme") = py::none());
  m.def("write_calib", &write_calib, py::arg("path"), py::arg("calib"));
  m.def("slice_for_rank", &slice_for_rank, py::arg("calib"), py::arg("tp"), py::arg("rank"));
  m.def(
      "scales_for_scheme",
      [](const CalibData& calib, const std::string& scheme, int tp, int rank) {
        return scales_for_scheme(calib, parse_scheme(scheme), tp, rank);
      },
      py::arg("calib"), py::arg("scheme"), py::arg("tp") = 1, py::arg("rank") = 0);
}
