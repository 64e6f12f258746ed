#include "python/dlpack_tensor.h"

#include <cstring>
#include <sstream>
#include <string>
#include <utility>

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
    case kDLInt:
      os << "int" << int(t.bits);
      break;
    case kDLUInt:
      os << "uint" << int(t.bits);
      break;
    case kDLFloat:
      os << "float" << int(t.bits);
      break;
    case kDLBfloat:
      os << "bfloat" << int(t.bits);
      break;
    case kDLFloat8E4m3fn:
      os << "float8_e4m3fn";
      break;
    case kDLFloat8E5m2:
      os << "float8_e5m2";
      break;
    default:
      os << "dtype(code " << int(t.code) << ", " << int(t.bits) << " bits)";
      break;
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

[[noreturn]] void not_dlpack(const py::handle& obj, const char* name) {
  throw py::type_error(std::string(name) + ": expected an array that supports DLPack " +
                       "(__dlpack__, e.g. a NumPy array or a torch tensor), got " +
                       std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

Device device_of_type(int type, int id, const char* name) {
  if (type == kDLDeviceCpu) return Device{false, 0};
  if (type == kDLDeviceCuda) return Device{true, id};
  throw py::value_error(std::string(name) + ": DLPack device type " + std::to_string(type) +
                        " is not supported: tensors must be in host memory (CPU backend) or " +
                        "on a CUDA GPU (CUDA backend)");
}

// Interned attribute names, made once (the module lives as long as the interpreter).
PyObject* intern(const char* s) {
  PyObject* o = PyUnicode_InternFromString(s);
  if (o == nullptr) throw py::error_already_set();
  return o;
}

// The object an attribute chain names, or null (error cleared) when a link is missing.
PyObject* lookup(PyObject* root, std::initializer_list<const char*> path) {
  PyObject* cur = root;
  Py_INCREF(cur);
  for (const char* p : path) {
    PyObject* next = PyObject_GetAttrString(cur, p);
    Py_DECREF(cur);
    if (next == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    cur = next;
  }
  return cur;  // a new reference, kept for the interpreter's lifetime by the caller
}

}  // namespace

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kBf16:
      return "bfloat16 (or uint16 holding bf16 bits)";
    case DType::kE4m3:
      return "uint8 (e4m3 codes) or float8_e4m3fn";
    case DType::kE5m2:
      return "uint8 (e5m2 codes) or float8_e5m2";
    case DType::kU8:
      return "uint8";
    case DType::kU16:
      return "uint16";
    case DType::kF32:
      return "float32";
    case DType::kI32:
      return "int32";
  }
  return "?";
}

std::string Device::str() const { return cuda ? "cuda:" + std::to_string(id) : "cpu"; }

const TorchHooks* torch_hooks() {
  static TorchHooks* hooks = nullptr;  // never freed, as the interpreter's modules
  if (hooks != nullptr) return hooks;
  // torch counts once it is imported (by anyone): a dict lookup per call until then.
  PyObject* torch = PyDict_GetItemString(PyImport_GetModuleDict(), "torch");
  if (torch == nullptr) return nullptr;
  auto* h = new TorchHooks;
  h->tensor_type = lookup(torch, {"Tensor"});
  h->parameter_type = lookup(torch, {"nn", "Parameter"});
  h->to_dlpack = lookup(torch, {"_C", "_to_dlpack"});
  h->current_raw_stream = lookup(torch, {"_C", "_cuda_getCurrentRawStream"});
  if (h->tensor_type == nullptr || h->to_dlpack == nullptr) {
    h->tensor_type = h->parameter_type = h->to_dlpack = nullptr;  // generic path for all
  }
  hooks = h;
  return hooks;
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

void Tensor::check_dtype(DType d) const {
  if (!dtype_matches(dl_->dtype, d)) {
    throw py::type_error(std::string(name_) + ": dtype " + describe_dtype(dl_->dtype) +
                         ", expected " + dtype_name(d));
  }
}

void Tensor::shape_error(const int64_t* want, int n) const {
  std::ostringstream os;
  os << name_ << ": shape " << shape_str() << ", expected [";
  for (int i = 0; i < n; ++i) {
    os << (i ? ", " : "");
    if (want[i] < 0) {
      os << "*";
    } else {
      os << want[i];
    }
  }
  os << "]";
  throw py::value_error(os.str());
}

void Tensor::check_dense() const {
  // Dense row-major: strides (in elements) may be absent (compact by definition); where given,
  // they must be those of a C-contiguous array, except along extents of 1 where they are moot.
  if (dl_->strides == nullptr) return;
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

const Tensor& Tensor::expect(DType d, std::initializer_list<int64_t> shape) const {
  check_dtype(d);
  const int n = static_cast<int>(shape.size());
  bool ok = n == dl_->ndim;
  for (int i = 0; ok && i < n; ++i) {
    const int64_t extent = shape.begin()[i];
    ok = extent < 0 || dl_->shape[i] == extent;
  }
  if (!ok) shape_error(shape.begin(), n);
  check_dense();
  return *this;
}

const Tensor& Tensor::expect_like(DType d, const Tensor& other) const {
  check_dtype(d);
  const int n = other.ndim();
  if (n != dl_->ndim || !std::equal(dl_->shape, dl_->shape + n, other.dl_->shape)) {
    shape_error(other.dl_->shape, n);
  }
  check_dense();
  return *this;
}

const Tensor& Tensor::expect_any_shape(DType d) const {
  check_dtype(d);
  check_dense();
  return *this;
}

Borrowed Borrowed::inspect(const py::handle& obj, const char* name) {
  Borrowed b;
  b.obj_ = obj;
  b.name_ = name;
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()));
  const TorchHooks* torch = torch_hooks();
  if (torch != nullptr && torch->to_dlpack != nullptr &&
      (type == torch->tensor_type || type == torch->parameter_type)) {
    // Exactly a torch tensor (subclasses may override __dlpack__: they take the generic path).
    PyObject* capsule = PyObject_CallOneArg(torch->to_dlpack, obj.ptr());
    if (capsule == nullptr) throw py::error_already_set();  // e.g. a dtype DLPack lacks
    py::object owned = py::reinterpret_steal<py::object>(capsule);
    // A torch whose C export changed its capsule (a versioned one): the generic path below.
    if (PyCapsule_IsValid(capsule, "dltensor")) {
      auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
      const DLDevice& d = managed->dl_tensor.device;
      b.device_ = device_of_type(static_cast<int>(d.device_type), d.device_id, name);
      b.capsule_ = std::move(owned);
      return b;
    }
  }
  static PyObject* const dlpack_device = intern("__dlpack_device__");
  PyObject* fn = PyObject_GetAttr(obj.ptr(), dlpack_device);
  if (fn == nullptr) {
    PyErr_Clear();
    not_dlpack(obj, name);
  }
  const py::object dev = py::reinterpret_steal<py::object>(PyObject_CallNoArgs(fn));
  Py_DECREF(fn);
  if (!dev) throw py::error_already_set();
  if (!PyTuple_Check(dev.ptr()) || PyTuple_GET_SIZE(dev.ptr()) != 2) {
    throw py::type_error(std::string(name) + ": __dlpack_device__() did not return a tuple " +
                         "(device_type, device_id)");
  }
  const long type_code = PyLong_AsLong(PyTuple_GET_ITEM(dev.ptr(), 0));
  const long id = PyLong_AsLong(PyTuple_GET_ITEM(dev.ptr(), 1));
  if (PyErr_Occurred()) throw py::error_already_set();
  b.device_ = device_of_type(static_cast<int>(type_code), static_cast<int>(id), name);
  return b;
}

Tensor Borrowed::borrow(const Device& device, std::optional<int64_t> stream) const {
  Tensor t;
  t.name_ = name_;
  if (capsule_) {
    t.capsule_ = capsule_;
  } else {
    static PyObject* const dlpack = intern("__dlpack__");
    PyObject* fn = PyObject_GetAttr(obj_.ptr(), dlpack);
    if (fn == nullptr) {
      PyErr_Clear();
      not_dlpack(obj_, name_);
    }
    PyObject* capsule;
    if (device.cuda && stream) {
      static PyObject* const stream_kw = intern("stream");
      const py::object s = py::int_(*stream);
      PyObject* args[] = {s.ptr()};
      const py::object kwnames = py::make_tuple(py::handle(stream_kw));
      capsule = PyObject_Vectorcall(fn, args, 0, kwnames.ptr());
    } else {
      capsule = PyObject_CallNoArgs(fn);
    }
    Py_DECREF(fn);
    if (capsule == nullptr) throw py::error_already_set();
    t.capsule_ = py::reinterpret_steal<py::object>(capsule);
  }
  if (!PyCapsule_IsValid(t.capsule_.ptr(), "dltensor")) {
    throw py::type_error(std::string(name_) + ": __dlpack__ did not return a DLPack capsule " +
                         "(\"dltensor\")");
  }
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(t.capsule_.ptr(), "dltensor"));
  t.dl_ = &managed->dl_tensor;
  t.data_ = static_cast<char*>(t.dl_->data) + t.dl_->byte_offset;
  return t;
}

}  // namespace fp8kv::python
