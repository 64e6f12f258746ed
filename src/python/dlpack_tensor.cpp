#include "python/dlpack_tensor.h"

#include <sstream>
#include <string>

namespace fp8kv::python {
namespace {

// DLPack >= 1.0 codes (dlpack.h 0.6 from Debian predates them).
constexpr uint8_t kDLFloat8E4m3fn = 10;
constexpr uint8_t kDLFloat8E5m2 = 12;
constexpr int kDLDeviceCpu = 1;
constexpr int kDLDeviceCuda = 2;

std::string describe_dtype(const DLDataType& t) {
  std::ostringstream os;
  switch (t.code) {
    case kDLInt: os << "int" << int(t.bits); break;
    case kDLUInt: os << "uint" << int(t.bits); break;
    case kDLFloat: os << "float" << int(t.bits); break;
    case kDLBfloat: os << "bfloat" << int(t.bits); break;
    case kDLFloat8E4m3fn: os << "float8_e4m3fn"; break;
    case kDLFloat8E5m2: os << "float8_e5m2"; break;
    default: os << "dtype(code " << int(t.code) << ", " << int(t.bits) << " bits)"; break;
  }
  if (t.lanes != 1) os << "x" << t.lanes;
  return os.str();
}

bool dtype_matches(const DLDataType& t, DType d) {
  if (t.lanes != 1) return false;
  switch (d) {
    case DType::kBf16:
      return t.bits == 16 && (t.code == kDLBfloat || t.code == kDLUInt);
    case DType::kE4m3:
      return t.bits == 8 && (t.code == kDLUInt || t.code == kDLFloat8E4m3fn);
    case DType::kE5m2:
      return t.bits == 8 && (t.code == kDLUInt || t.code == kDLFloat8E5m2);
    case DType::kU8:
      return t.bits == 8 && t.code == kDLUInt;
    case DType::kU16:
      return t.bits == 16 && t.code == kDLUInt;
    case DType::kF32:
      return t.bits == 32 && t.code == kDLFloat;
    case DType::kI32:
      return t.bits == 32 && t.code == kDLInt;
  }
  return false;
}

}  // namespace

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kBf16: return "bfloat16 (or uint16 holding bf16 bits)";
    case DType::kE4m3: return "uint8 (e4m3 codes) or float8_e4m3fn";
    case DType::kE5m2: return "uint8 (e5m2 codes) or float8_e5m2";
    case DType::kU8: return "uint8";
    case DType::kU16: return "uint16";
    case DType::kF32: return "float32";
    case DType::kI32: return "int32";
  }
  return "?";
}

std::string Device::str() const { return cuda ? "cuda:" + std::to_string(id) : "cpu"; }

Device device_of(const py::handle& obj, const char* name) {
  if (!py::hasattr(obj, "__dlpack_device__") || !py::hasattr(obj, "__dlpack__")) {
    throw py::type_error(std::string(name) + ": expected an array that supports DLPack " +
                         "(__dlpack__, e.g. a NumPy array or a torch tensor), got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  const auto dev = obj.attr("__dlpack_device__")().cast<py::tuple>();
  const int type = dev[0].cast<int>();
  const int id = dev[1].cast<int>();
  if (type == kDLDeviceCpu) return Device{false, 0};
  if (type == kDLDeviceCuda) return Device{true, id};
  throw py::value_error(std::string(name) + ": DLPack device type " + std::to_string(type) +
                        " is not supported: tensors must be in host memory (CPU backend) or " +
                        "on a CUDA GPU (CUDA backend)");
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < dl_->ndim; ++i) n *= dl_->shape[i];
  return n;
}

std::string Tensor::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < dl_->ndim; ++i) os << (i ? ", " : "") << dl_->shape[i];
  os << "]";
  return os.str();
}

const Tensor& Tensor::expect(DType d, const std::vector<int64_t>& shape) const {
  if (!dtype_matches(dl_->dtype, d)) {
    throw py::type_error(std::string(name_) + ": dtype " + describe_dtype(dl_->dtype) +
                         ", expected " + dtype_name(d));
  }
  bool ok = static_cast<int>(shape.size()) == dl_->ndim;
  std::ostringstream want;
  want << "[";
  int i = 0;
  for (int64_t extent : shape) {
    want << (i ? ", " : "");
    if (extent < 0) {
      want << "*";
    } else {
      want << extent;
      if (ok && dl_->shape[i] != extent) ok = false;
    }
    ++i;
  }
  want << "]";
  if (!ok) {
    throw py::value_error(std::string(name_) + ": shape " + shape_str() + ", expected " +
                          want.str());
  }
  // Dense row-major: strides (in elements) may be absent (compact by definition); where given,
  // they must be those of a C-contiguous array, except along extents of 1 where they are moot.
  if (dl_->strides != nullptr) {
    int64_t expected = 1;
    for (int dim = dl_->ndim - 1; dim >= 0; --dim) {
      if (dl_->shape[dim] != 1 && dl_->strides[dim] != expected) {
        std::ostringstream os;
        os << name_ << ": not contiguous (strides [";
        for (int k = 0; k < dl_->ndim; ++k) os << (k ? ", " : "") << dl_->strides[k];
        os << "] elements for shape " << shape_str()
           << "): pass a contiguous array (.contiguous() / numpy.ascontiguousarray)";
        throw py::value_error(os.str());
      }
      expected *= dl_->shape[dim];
    }
  }
  return *this;
}

Tensor borrow(const py::handle& obj, const char* name, const Device& device,
              std::optional<int64_t> stream) {
  Tensor t;
  t.name_ = name;
  if (device.cuda && stream) {
    t.capsule_ = obj.attr("__dlpack__")(py::arg("stream") = *stream);
  } else {
    t.capsule_ = obj.attr("__dlpack__")();
  }
  if (!PyCapsule_IsValid(t.capsule_.ptr(), "dltensor")) {
    throw py::type_error(std::string(name) + ": __dlpack__ did not return a DLPack capsule " +
                         "(\"dltensor\")");
  }
  auto* managed =
      static_cast<DLManagedTensor*>(PyCapsule_GetPointer(t.capsule_.ptr(), "dltensor"));
  t.dl_ = &managed->dl_tensor;
  t.data_ = static_cast<char*>(t.dl_->data) + t.dl_->byte_offset;
  return t;
}

}  // namespace fp8kv::python
