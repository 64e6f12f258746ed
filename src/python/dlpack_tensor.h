// Tensors of any framework, borrowed over DLPack for the duration of one call: the data pointer
// of the producer's own memory (no copy), with its dtype, shape, strides and device checked
// against what a kernel argument needs before any kernel runs.
//
// Two steps per argument, so that every refusal comes before any memory is touched:
//   1. device_of(obj): the producer's __dlpack_device__(): which backend, which GPU;
//   2. borrow(obj, ...): the producer's __dlpack__(...) capsule, kept alive by the Tensor; the
//      capsule is not consumed (its destructor releases the producer's reference when the
//      Tensor goes away, at the end of the call).
#pragma once

#include <dlpack/dlpack.h>
#include <pybind11/pybind11.h>

#include <cstdint>
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

// The device of a DLPack producer; TypeError when `obj` does not speak DLPack, ValueError for
// a device that is neither the CPU nor a CUDA GPU.
Device device_of(const py::handle& obj, const char* name);

// A borrowed tensor. data() points into the producer's memory.
class Tensor {
 public:
  Tensor() = default;
  const char* name() const { return name_; }
  void* data() const { return data_; }
  int ndim() const { return dl_->ndim; }
  int64_t size(int dim) const { return dl_->shape[dim]; }
  int64_t numel() const;
  std::string shape_str() const;
  template <class T>
  T* as() const {
    return static_cast<T*>(data_);
  }

  // Throws TypeError unless the element type is `d`; ValueError unless the shape matches
  // `shape` (-1: any extent) and the layout is dense row-major.
  const Tensor& expect(DType d, const std::vector<int64_t>& shape) const;
  // The shape as a list of extents.
  std::vector<int64_t> shape() const { return {dl_->shape, dl_->shape + dl_->ndim}; }

 private:
  friend Tensor borrow(const py::handle&, const char*, const Device&, std::optional<int64_t>);
  py::object capsule_;
  DLTensor* dl_ = nullptr;
  void* data_ = nullptr;
  const char* name_ = "";
};

// Borrows `obj` (on `device`, already checked by device_of). For CUDA, `stream` is what is
// passed to __dlpack__(stream=...): the producer orders its pending work before that stream
// (-1: no ordering, the work goes on the producer's own current stream).
Tensor borrow(const py::handle& obj, const char* name, const Device& device,
              std::optional<int64_t> stream);

}  // namespace fp8kv::python
