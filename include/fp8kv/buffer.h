// The one owning buffer type: an allocation in a Backend's memory (kernels, runtime, tests and
// the benchmark all use it).
#pragma once

#include <cstddef>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/export.h"

namespace fp8kv {

// An allocation in a backend's memory, freed on destruction. Move-only.
class FP8KV_API BackendBuffer {
 public:
  BackendBuffer() = default;
  BackendBuffer(Backend& backend, size_t bytes);
  // A buffer holding a copy of `host` (uploaded at once).
  template <class T>
  BackendBuffer(Backend& backend, const std::vector<T>& host)
      : BackendBuffer(backend, host.size() * sizeof(T)) {
    upload(host.data(), bytes());
  }
  ~BackendBuffer();
  BackendBuffer(BackendBuffer&& o) noexcept;
  BackendBuffer& operator=(BackendBuffer&& o) noexcept;
  BackendBuffer(const BackendBuffer&) = delete;
  BackendBuffer& operator=(const BackendBuffer&) = delete;

  // Grows to at least `bytes` (contents are not kept).
  void ensure(Backend& backend, size_t bytes);
  void upload(const void* host, size_t bytes);
  void download(void* host, size_t bytes) const;
  // The whole buffer as host values, after the backend's queued work has finished.
  template <class T>
  std::vector<T> download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    download(host.data(), host.size() * sizeof(T));
    backend_->synchronize();
    return host;
  }

  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }
  bool empty() const { return ptr_ == nullptr; }

 private:
  void release();
  Backend* backend_ = nullptr;
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace fp8kv
