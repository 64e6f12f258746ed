// Safetensors files (the Hugging Face weight format): reader, sharded model folders, writer.
//
// A file is: an 8-byte little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data section; offsets are relative to the start of the data section. Every offset
// and size is checked against the file size before anything is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fp8kv/dtype.h"
#include "fp8kv/export.h"
#include "fp8kv/fp8.h"

namespace fp8kv {

struct FP8KV_API TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets into the data section, [begin, end)
  uint64_t end = 0;
  int64_t numel() const;
};

FP8KV_API std::string shape_to_string(const std::vector<int64_t>& shape);  // "[4096, 1024]"

// One .safetensors file, memory-mapped read-only. Throws Error naming the file (and the tensor)
// on a short file, a bad header, an unknown dtype or offsets outside the file.
class FP8KV_API SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return tensors_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;

  // The tensor converted to fp32. `expected_shape`, when not empty, must match exactly.
  std::vector<float> read_f32(const std::string& name,
                              const std::vector<int64_t>& expected_shape = {}) const;
  // The tensor's raw bytes (little-endian, as stored).
  const uint8_t* raw(const std::string& name) const;

 private:
  std::string path_;
  std::map<std::string, TensorInfo> tensors_;
  const uint8_t* map_ = nullptr;  // the whole file
  size_t map_size_ = 0;
  uint64_t data_start_ = 0;  // 8 + N
};

// The weights of a model folder: model.safetensors, or the shards listed in
// model.safetensors.index.json ("weight_map": {tensor: file}), or else every *.safetensors file.
// Refused (Error naming the file and the tensor): an index listing a tensor twice, a shard the
// index names that does not exist, a tensor the index places in a shard that lacks it, and
// without an index a tensor in two files. Tensors a shard holds that the index does not place
// there are not part of the model (unlisted()).
class FP8KV_API WeightStore {
 public:
  explicit WeightStore(const std::string& dir);
  bool has(const std::string& name) const;
  std::vector<std::string> names() const;  // every tensor of the model, sorted
  // The tensor's bytes in its file's mapping (valid while the store lives), and its file name.
  const uint8_t* raw(const std::string& name) const;
  const std::string& file_name_of(const std::string& name) const;
  struct Unlisted {
    std::string tensor, file;
  };
  const std::vector<Unlisted>& unlisted() const { return unlisted_; }
  // Throws Error naming the tensor and where it was looked for when missing; the file and the
  // tensor when the shape is not `expected_shape`.
  std::vector<float> read_f32(const std::string& name,
                              const std::vector<int64_t>& expected_shape) const;
  const TensorInfo& info(const std::string& name) const;
  const std::vector<std::string>& files() const { return file_names_; }

 private:
  const SafetensorsFile& file_of(const std::string& name) const;
  std::string dir_;
  std::vector<std::string> file_names_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
  std::vector<Unlisted> unlisted_;
};

// Writing. Tensors are written in the given order; fill(i, dst, bytes) produces tensor i's
// bytes (little-endian, dtype as declared) into dst, one tensor at a time, so a large file is
// never held in memory whole. The file appears atomically (temp file + rename).
struct TensorSpec {
  std::string name;
  DType dtype = DType::kBF16;
  std::vector<int64_t> shape;
};
using TensorFill = std::function<void(size_t index, uint8_t* dst, size_t bytes)>;
FP8KV_API void write_safetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                                 const TensorFill& fill);

// Several files at once, in parallel: each tensor is cut into pieces of at most piece_bytes,
// and `threads` workers each fill a piece -- fill(file, tensor, offset, dst, bytes) produces
// bytes [offset, offset + bytes) of that tensor's data -- and write it at its place (pwrite).
// Host memory: one piece per worker. Every file appears atomically (temp file + rename) once all
// are written; on an error none does.
struct SafetensorsFileSpec {
  std::string path;
  std::vector<TensorSpec> tensors;
};
using TensorRangeFill =
    std::function<void(size_t file, size_t tensor, uint64_t offset, uint8_t* dst, size_t bytes)>;
FP8KV_API void write_safetensors_files(const std::vector<SafetensorsFileSpec>& files,
                                       const TensorRangeFill& fill, uint64_t piece_bytes,
                                       int threads);

}  // namespace fp8kv
