#include "fp8kv/buffer.h"

#include <algorithm>
#include <string>

#include "fp8kv/error.h"

namespace fp8kv {

BackendBuffer::BackendBuffer(Backend& backend, size_t bytes) : backend_(&backend), bytes_(bytes) {
  ptr_ = bytes ? backend.alloc(bytes) : nullptr;
}

BackendBuffer::~BackendBuffer() { release(); }

BackendBuffer::BackendBuffer(BackendBuffer&& o) noexcept
    : backend_(o.backend_), ptr_(o.ptr_), bytes_(o.bytes_) {
  o.ptr_ = nullptr;
  o.bytes_ = 0;
}

BackendBuffer& BackendBuffer::operator=(BackendBuffer&& o) noexcept {
  if (this != &o) {
    release();
    backend_ = o.backend_;
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void BackendBuffer::release() {
  if (ptr_ && backend_) backend_->free(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

void BackendBuffer::ensure(Backend& backend, size_t bytes) {
  if (ptr_ && bytes_ >= bytes && backend_ == &backend) return;
  release();
  backend_ = &backend;
  // Grow geometrically so a sequence of slightly larger batches does not reallocate each time.
  bytes_ = std::max(bytes, bytes_ + bytes_ / 2);
  ptr_ = bytes_ ? backend.alloc(bytes_) : nullptr;
}

void BackendBuffer::upload(const void* host, size_t bytes) {
  if (bytes > bytes_) {
    throw Error("BackendBuffer::upload: " + std::to_string(bytes) + " bytes into a buffer of " +
                std::to_string(bytes_));
  }
  if (bytes) backend_->upload(ptr_, host, bytes);
}

void BackendBuffer::download(void* host, size_t bytes) const {
  if (bytes > bytes_) {
    throw Error("BackendBuffer::download: " + std::to_string(bytes) + " bytes from a buffer of " +
                std::to_string(bytes_));
  }
  if (bytes) backend_->download(host, ptr_, bytes);
}

}  // namespace fp8kv
