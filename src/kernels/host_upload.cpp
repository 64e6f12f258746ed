#include "kernels/host_upload.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"

namespace fp8kv {

namespace {

// One element of `from` at p as float (exact).
inline float load_float(const uint8_t* p, DType from) {
  uint16_t h;
  switch (from) {
    case DType::kF32: {
      float x;
      std::memcpy(&x, p, 4);
      return x;
    }
    case DType::kBF16:
      std::memcpy(&h, p, 2);
      return bf16_to_float(h);
    case DType::kF16:
      std::memcpy(&h, p, 2);
      return f16_to_float(h);
  }
  return 0.0f;
}

// n elements from `src` (from) to `dst` (to).
void convert(const uint8_t* src, DType from, uint8_t* dst, DType to, int64_t n) {
  if (from == to) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_bytes(from));
    return;
  }
  const int sb = dtype_bytes(from);
  if (to == DType::kF32) {
    for (int64_t i = 0; i < n; ++i) {
      const float x = load_float(src + i * sb, from);
      std::memcpy(dst + 4 * i, &x, 4);
    }
    return;
  }
  // to BF16 (validate_uploads refuses an F16 destination).
  for (int64_t i = 0; i < n; ++i) {
    uint16_t b;
    if (from == DType::kF16) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, 2);
      b = f16_to_bf16(h);
    } else {
      b = float_to_bf16(load_float(src + i * sb, from));
    }
    std::memcpy(dst + 2 * i, &b, 2);
  }
}

}  // namespace

void validate_uploads(const std::vector<HostUpload>& uploads) {
  for (size_t i = 0; i < uploads.size(); ++i) {
    const HostUpload& u = uploads[i];
    const std::string what = "upload_tensors: upload " + std::to_string(i) + ": ";
    auto range = [&](const char* name, int64_t begin, int64_t count, int64_t total) {
      if (begin < 0 || count < 0 || begin > total || count > total - begin) {
        throw Error(what + name + " [" + std::to_string(begin) + ", +" + std::to_string(count) +
                    ") is not inside [0, " + std::to_string(total) + ")");
      }
    };
    if (u.src_rows < 0 || u.src_cols < 0) {
      throw Error(what + "source shape [" + std::to_string(u.src_rows) + ", " +
                  std::to_string(u.src_cols) + "] has a negative dimension");
    }
    range("rows", u.row_begin, u.rows, u.src_rows);
    range("cols", u.col_begin, u.cols, u.src_cols);
    if (u.dst_dtype == DType::kF16)
      throw Error(what + "dst_dtype F16 is not supported (BF16, F32)");
    if (u.rows * u.cols > 0 && (u.dst == nullptr || u.src == nullptr)) {
      throw Error(what + (u.dst == nullptr ? "dst" : "src") + " is null");
    }
  }
}

size_t largest_upload_row(const std::vector<HostUpload>& uploads) {
  size_t m = 0;
  for (const HostUpload& u : uploads) {
    m = std::max(m, static_cast<size_t>(u.cols) * dtype_bytes(u.dst_dtype));
  }
  return m;
}

std::vector<UploadChunk> plan_upload_chunks(const std::vector<HostUpload>& uploads,
                                            size_t max_bytes) {
  std::vector<UploadChunk> chunks;
  for (size_t i = 0; i < uploads.size(); ++i) {
    const HostUpload& u = uploads[i];
    if (u.rows == 0 || u.cols == 0) continue;
    const size_t row_bytes = static_cast<size_t>(u.cols) * dtype_bytes(u.dst_dtype);
    const int64_t step = std::max<int64_t>(1, static_cast<int64_t>(max_bytes / row_bytes));
    for (int64_t r = 0; r < u.rows; r += step) {
      chunks.push_back({i, r, std::min(u.rows, r + step), static_cast<size_t>(r) * row_bytes});
    }
  }
  return chunks;
}

void pack_rows(const HostUpload& u, int64_t row0, int64_t row1, void* out, DType out_dtype) {
  const int sb = dtype_bytes(u.src_dtype);
  const int ob = dtype_bytes(out_dtype);
  const auto* src = static_cast<const uint8_t*>(u.src);
  auto* dst = static_cast<uint8_t*>(out);
  if (u.col_begin == 0 && u.cols == u.src_cols) {  // whole rows: one contiguous run
    convert(src + (u.row_begin + row0) * u.src_cols * sb, u.src_dtype, dst, out_dtype,
            (row1 - row0) * u.cols);
    return;
  }
  for (int64_t r = row0; r < row1; ++r) {
    convert(src + ((u.row_begin + r) * u.src_cols + u.col_begin) * sb, u.src_dtype,
            dst + (r - row0) * u.cols * ob, out_dtype, u.cols);
  }
}

void run_workers(int threads, const std::function<void(int worker)>& fn) {
  std::exception_ptr first;
  std::mutex mu;
  auto guarded = [&](int w) {
    try {
      fn(w);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!first) first = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < threads; ++w) pool.emplace_back(guarded, w);
  guarded(0);
  for (std::thread& t : pool) t.join();
  if (first) std::rethrow_exception(first);
}

int upload_threads(int cap) {
  const int hw = static_cast<int>(std::thread::hardware_concurrency());
  return std::max(1, std::min(cap, hw));
}

}  // namespace fp8kv
