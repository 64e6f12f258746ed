// Tensors of any framework, borrowed over DLPack for the duration of one call: the data pointer
// of the producer's own memory (no copy), with its dtype, shape, strides and device checked
// against what a kernel argument needs before any kernel runs.
//
// Two steps per argument, so that every refusal comes before any memory is touched:
//   1. inspect(obj): which backend, which GPU. For a torch tensor (exactly torch.Tensor or
//      torch.nn.Parameter) this already takes the capsule from torch's C function
//      torch._C._to_dlpack -- what Tensor.__dlpack__() returns, without its Python layer, which
//      costs more than the kernel launch -- and reads the device from it. Any other producer
//      answers __dlpack_device__() here and is borrowed in step 2;
//   2. borrow(...): the producer's __dlpack__(...) capsule (or the one from step 1), kept alive
//      by the Tensor; the capsule is not consumed (its destructor releases the producer's
//      reference when the Tensor goes away, at the end of the call).
// Nothing here allocates on the success path beyond what the producer does for its capsule:
// the binding's share of a decode call stays a few microseconds.
#pragma once

#include <dlpack/dlpack.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace fp8kv::python {

namespace py = pybind11;

// Element types the kernels take. kBf16 accepts DLPack bfloat16 and uint16 (NumPy has no bf16:
// a uint16 array holds bf16 bit patterns); kE4m3 accepts uint8 (e4m3 codes) and DLPack's
// float8_e4m3fn; kE5m2 uint8 (e5m2 codes) and DLPack's float8_e5m2.
enum class DType { kBf16, kE4m3, kE5m2, kU8, kU16, kF32, kI32 };
const char* dtype_name(DType d);

// Where a tensor lives: the CPU (host memory) or CUDA device `id`.
struct Device {
  bool cuda = false;
  int id = 0;
  bool operator==(const Device& o) const { return cuda == o.cuda && (!cuda || id == o.id); }
  std::string str() const;
};

// torch's C entry points, looked up once torch is imported (null members: not available).
struct TorchHooks {
  PyObject* tensor_type = nullptr;         // torch.Tensor
  PyObject* parameter_type = nullptr;      // torch.nn.Parameter
  PyObject* to_dlpack = nullptr;           // torch._C._to_dlpack(tensor) -> "dltensor" capsule
  PyObject* current_raw_stream = nullptr;  // torch._C._cuda_getCurrentRawStream(device) -> int
};
// Null while torch is not imported (then every tensor takes the generic DLPack path).
const TorchHooks* torch_hooks();

// A borrowed tensor. data() points into the producer's memory.
class Tensor {
 public:
  Tensor() = default;
  const char* name() const { return name_; }
  void* data() const { return data_; }
  int ndim() const { return dl_->ndim; }
  int64_t size(int dim) const { return dl_->shape[dim]; }
  // The shape as a list of extents.
  std::vector<int64_t> shape() const { return {dl_->shape, dl_->shape + dl_->ndim}; }
  int64_t numel() const;
  std::string shape_str() const;
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  // Throws TypeError unless the element type is `d`; ValueError unless the shape matches
  // `shape` (-1: any extent) and the layout is dense row-major.
  const Tensor& expect(DType d, std::initializer_list<int64_t> shape) const;
  // The same, with the shape of `other` (out shaped like q).
  const Tensor& expect_like(DType d, const Tensor& other) const;
  // Element type and layout only (any shape).
  const Tensor& expect_any_shape(DType d) const;

 private:
  friend class Borrowed;
  void check_dtype(DType d) const;
  void check_dense() const;
  [[noreturn]] void shape_error(const int64_t* want, int n) const;
  py::object capsule_;
  DLTensor* dl_ = nullptr;
  void* data_ = nullptr;
  const char* name_ = "";
};

// One argument object, inspected (step 1): its device and, for torch tensors, its capsule.
class Borrowed {
 public:
  // TypeError when `obj` does not speak DLPack, ValueError for a device that is neither the CPU
  // nor a CUDA GPU.
  static Borrowed inspect(const py::handle& obj, const char* name);
  const Device& device() const { return device_; }
  // Step 2. For CUDA producers without a capsule yet, `stream` is what is passed to
  // __dlpack__(stream=...): the producer orders its pending work before that stream (-1: no
  // ordering, the work goes on the producer's own current stream).
  Tensor borrow(const Device& device, std::optional<int64_t> stream) const;
  // Whether the capsule came from torch (its pending work is on torch's current stream).
  bool torch() const { return capsule_.ptr() != nullptr; }

 private:
  py::handle obj_;
  const char* name_ = "";
  Device device_;
  py::object capsule_;  // torch tensors: taken in inspect()
};

}  // namespace fp8kv::python
