#include "fp8kv/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <nlohmann/json.hpp>
#include <sstream>

#include "fp8kv/error.h"
#include "fp8kv/fp8.h"
#include "kernels/host_upload.h"

namespace fp8kv {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// A header larger than this is not a weight file (the biggest real ones are a few MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

DType parse_dtype(const std::string& s, const std::string& file, const std::string& tensor) {
  if (s == "BF16") return DType::kBF16;
  if (s == "F16") return DType::kF16;
  if (s == "F32") return DType::kF32;
  throw Error(file + ": tensor '" + tensor + "' has dtype '" + s + "', not one of BF16, F16, F32");
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_to_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// ---- reader --------------------------------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(errno));
  }
  map_size_ = static_cast<size_t>(st.st_size);
  if (map_size_ < 8) {
    ::close(fd);
    throw Error(path + ": file is " + std::to_string(map_size_) +
                " bytes, too short for a safetensors header");
  }
  void* m = ::mmap(nullptr, map_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (m == MAP_FAILED) throw Error(path + ": cannot map: " + std::strerror(errno));
  map_ = static_cast<const uint8_t*>(m);

  try {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | map_[i];
    if (n > kMaxHeaderBytes || n > map_size_ - 8) {
      throw Error(path + ": header length " + std::to_string(n) + " exceeds the file (" +
                  std::to_string(map_size_) + " bytes): truncated or not a safetensors file");
    }
    data_start_ = 8 + n;
    const uint64_t data_size = map_size_ - data_start_;
    json header;
    try {
      header = json::parse(reinterpret_cast<const char*>(map_ + 8),
                           reinterpret_cast<const char*>(map_ + 8 + n));
    } catch (const json::exception& e) {
      throw Error(path + ": header is not valid JSON: " + e.what());
    }
    if (!header.is_object()) throw Error(path + ": header is not a JSON object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      if (name == "__metadata__") continue;
      const json& t = it.value();
      const std::string where = path + ": tensor '" + name + "'";
      if (!t.is_object() || !t.contains("dtype") || !t["dtype"].is_string() ||
          !t.contains("shape") || !t["shape"].is_array() || !t.contains("data_offsets") ||
          !t["data_offsets"].is_array() || t["data_offsets"].size() != 2) {
        throw Error(where +
                    ": entry needs dtype (string), shape (array) and data_offsets "
                    "([begin, end])");
      }
      TensorInfo info;
      info.name = name;
      info.dtype = parse_dtype(t["dtype"].get<std::string>(), path, name);
      uint64_t numel = 1;
      for (const json& d : t["shape"]) {
        if (!d.is_number_integer() || d.get<int64_t>() < 0) {
          throw Error(where + ": shape " + t["shape"].dump() + " has a bad dimension");
        }
        const uint64_t dim = d.get<uint64_t>();
        if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / dim) {
          throw Error(where + ": shape " + t["shape"].dump() + " is too large");
        }
        numel *= dim;
        info.shape.push_back(static_cast<int64_t>(dim));
      }
      for (const json& o : t["data_offsets"]) {
        if (!o.is_number_integer() || o.get<int64_t>() < 0) {
          throw Error(where + ": data_offsets " + t["data_offsets"].dump() +
                      " must be non-negative integers");
        }
      }
      info.begin = t["data_offsets"][0].get<uint64_t>();
      info.end = t["data_offsets"][1].get<uint64_t>();
      if (info.end < info.begin || info.end > data_size) {
        throw Error(where + ": data_offsets [" + std::to_string(info.begin) + ", " +
                    std::to_string(info.end) + "] lie outside the data section (" +
                    std::to_string(data_size) + " bytes): truncated file or bad offsets");
      }
      const uint64_t want = numel * static_cast<uint64_t>(dtype_bytes(info.dtype));
      if (info.end - info.begin != want) {
        throw Error(where + ": data_offsets span " + std::to_string(info.end - info.begin) +
                    " bytes but " + dtype_name(info.dtype) + " " + shape_to_string(info.shape) +
                    " needs " + std::to_string(want));
      }
      tensors_.emplace(name, std::move(info));
    }
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), map_size_);
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(path_ + ": no tensor '" + name + "'");
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : tensors_) out.push_back(kv.first);
  return out;
}

const uint8_t* SafetensorsFile::raw(const std::string& name) const {
  return map_ + data_start_ + info(name).begin;
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name,
                                             const std::vector<int64_t>& expected_shape) const {
  const TensorInfo& t = info(name);
  if (!expected_shape.empty() && t.shape != expected_shape) {
    throw Error(path_ + ": tensor '" + name + "' has shape " + shape_to_string(t.shape) +
                ", expected " + shape_to_string(expected_shape));
  }
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  const uint8_t* src = raw(name);
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out.data(), src, static_cast<size_t>(n) * 4);
      break;
    case DType::kBF16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        out[i] = bf16_to_float(b);
      }
      break;
    case DType::kF16:
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        uint16_t b;
        std::memcpy(&b, src + 2 * i, 2);
        out[i] = f16_to_float(b);
      }
      break;
  }
  return out;
}

// ---- model folders -------------------------------------------------------------------------

WeightStore::WeightStore(const std::string& dir) : dir_(dir) {
  if (!fs::is_directory(dir)) throw Error(dir + ": not a model folder");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;  // tensor -> file name
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    // A key twice in "weight_map" would otherwise keep the last silently: note it while parsing.
    std::string top_key, duplicate;
    std::set<std::string> seen;
    const json::parser_callback_t watch = [&](int depth, json::parse_event_t event, json& parsed) {
      if (event == json::parse_event_t::key && parsed.is_string()) {
        if (depth == 1) top_key = parsed.get<std::string>();
        if (depth == 2 && top_key == "weight_map" &&
            !seen.insert(parsed.get<std::string>()).second && duplicate.empty()) {
          duplicate = parsed.get<std::string>();
        }
      }
      return true;
    };
    try {
      j = json::parse(in, watch);
    } catch (const json::exception& e) {
      throw Error(index.string() + ": not valid JSON: " + e.what());
    }
    if (!duplicate.empty()) {
      throw Error(index.string() + ": weight_map lists tensor '" + duplicate +
                  "' twice (which shard holds it?)");
    }
    if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
      throw Error(index.string() + ": missing object field 'weight_map'");
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        throw Error(index.string() + ": weight_map entry '" + it.key() + "' is not a file name");
      }
      weight_map[it.key()] = it.value().get<std::string>();
    }
    for (const auto& kv : weight_map) {
      if (std::find(file_names_.begin(), file_names_.end(), kv.second) == file_names_.end()) {
        file_names_.push_back(kv.second);
      }
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    file_names_.push_back("model.safetensors");
  } else {
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().extension() == ".safetensors") file_names_.push_back(e.path().filename());
    }
    std::sort(file_names_.begin(), file_names_.end());
  }
  if (file_names_.empty()) throw Error(dir + ": no *.safetensors files");
  for (const std::string& f : file_names_) {
    const fs::path p = fs::path(dir) / f;
    if (!fs::exists(p)) {
      throw Error(index.string() + ": lists shard '" + f + "', which does not exist");
    }
    files_.push_back(std::make_unique<SafetensorsFile>(p.string()));
  }
  if (!weight_map.empty()) {
    for (const auto& kv : weight_map) {
      const size_t i = static_cast<size_t>(
          std::find(file_names_.begin(), file_names_.end(), kv.second) - file_names_.begin());
      if (!files_[i]->has(kv.first)) {
        throw Error(files_[i]->path() + ": no tensor '" + kv.first + "', which " + index.string() +
                    " places there");
      }
      where_[kv.first] = i;
    }
    // Tensors a shard holds beyond what the index places there: not part of the model.
    for (size_t i = 0; i < files_.size(); ++i) {
      for (const std::string& n : files_[i]->names()) {
        auto it = where_.find(n);
        if (it == where_.end() || it->second != i) unlisted_.push_back({n, file_names_[i]});
      }
    }
  } else {
    for (size_t i = 0; i < files_.size(); ++i) {
      for (const std::string& n : files_[i]->names()) {
        auto [it, fresh] = where_.emplace(n, i);
        if (!fresh) {
          throw Error(dir + ": tensor '" + n + "' is in both " + file_names_[it->second] + " and " +
                      file_names_[i] +
                      " (and no model.safetensors.index.json says "
                      "which to use)");
        }
      }
    }
  }
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const std::string& WeightStore::file_name_of(const std::string& name) const {
  file_of(name);  // throws naming the tensor when it is missing
  return file_names_[where_.at(name)];
}

const uint8_t* WeightStore::raw(const std::string& name) const { return file_of(name).raw(name); }

bool WeightStore::has(const std::string& name) const { return where_.count(name) != 0; }

const SafetensorsFile& WeightStore::file_of(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string files;
    for (const auto& f : file_names_) files += (files.empty() ? "" : ", ") + f;
    throw Error(dir_ + ": missing tensor '" + name + "' (looked in " + files + ")");
  }
  return *files_[it->second];
}

const TensorInfo& WeightStore::info(const std::string& name) const {
  return file_of(name).info(name);
}

std::vector<float> WeightStore::read_f32(const std::string& name,
                                         const std::vector<int64_t>& expected_shape) const {
  return file_of(name).read_f32(name, expected_shape);
}

// ---- writer --------------------------------------------------------------------------------

namespace {

// The header text of a file holding `tensors` in order, padded so that the data section starts
// 8-byte aligned (as the reference writer does); sizes[i]: tensor i's bytes.
std::string header_text(const std::vector<TensorSpec>& tensors, std::vector<uint64_t>& sizes) {
  json header = json::object();
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    const uint64_t bytes = n * static_cast<uint64_t>(dtype_bytes(t.dtype));
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    sizes.push_back(bytes);
    offset += bytes;
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  return text;
}

void pwrite_all(int fd, const uint8_t* p, size_t bytes, uint64_t offset, const std::string& path) {
  while (bytes) {
    const ssize_t n = ::pwrite(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw Error(path + ": write failed: " + std::strerror(errno) + " (disk full?)");
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

}  // namespace

void write_safetensors_files(const std::vector<SafetensorsFileSpec>& files,
                             const TensorRangeFill& fill, uint64_t piece_bytes, int threads) {
  struct Open {
    std::string tmp;
    int fd = -1;
    std::vector<uint64_t> offsets;  // of each tensor, from the start of the file
  };
  std::vector<Open> open(files.size());
  // Pieces: (file, tensor, offset in the tensor, bytes), each filled and written by one worker.
  struct Piece {
    size_t file, tensor;
    uint64_t offset, bytes;
  };
  std::vector<Piece> pieces;
  uint64_t largest = 0;
  auto cleanup = [&] {
    for (Open& o : open) {
      if (o.fd >= 0) ::close(o.fd);
      o.fd = -1;
      if (!o.tmp.empty()) ::unlink(o.tmp.c_str());
    }
  };
  try {
    for (size_t f = 0; f < files.size(); ++f) {
      std::vector<uint64_t> sizes;
      const std::string text = header_text(files[f].tensors, sizes);
      Open& o = open[f];
      o.tmp = files[f].path + ".tmp";
      o.fd = ::open(o.tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (o.fd < 0) throw Error(o.tmp + ": cannot create: " + std::strerror(errno));
      uint8_t len[8];
      for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(text.size() >> (8 * i));
      pwrite_all(o.fd, len, 8, 0, o.tmp);
      pwrite_all(o.fd, reinterpret_cast<const uint8_t*>(text.data()), text.size(), 8, o.tmp);
      uint64_t at = 8 + text.size();
      for (size_t t = 0; t < sizes.size(); ++t) {
        o.offsets.push_back(at);
        for (uint64_t off = 0; off < sizes[t]; off += piece_bytes) {
          const uint64_t bytes = std::min(piece_bytes, sizes[t] - off);
          pieces.push_back({f, t, off, bytes});
          largest = std::max(largest, bytes);
        }
        at += sizes[t];
      }
      if (::ftruncate(o.fd, static_cast<off_t>(at)) != 0) {
        throw Error(o.tmp + ": cannot size to " + std::to_string(at) +
                    " bytes: " + std::strerror(errno));
      }
    }
    std::atomic<size_t> next{0};
    run_workers(std::max(1, threads), [&](int) {
      std::vector<uint8_t> buf;
      for (size_t i = next++; i < pieces.size(); i = next++) {
        const Piece& p = pieces[i];
        buf.assign(p.bytes, 0);
        fill(p.file, p.tensor, p.offset, buf.data(), p.bytes);
        pwrite_all(open[p.file].fd, buf.data(), p.bytes, open[p.file].offsets[p.tensor] + p.offset,
                   open[p.file].tmp);
      }
    });
    for (size_t f = 0; f < files.size(); ++f) {
      Open& o = open[f];
      const int rc = ::close(o.fd);
      o.fd = -1;
      if (rc != 0) throw Error(o.tmp + ": write failed: " + std::strerror(errno));
    }
    for (size_t f = 0; f < files.size(); ++f) {
      std::error_code ec;
      fs::rename(open[f].tmp, files[f].path, ec);
      if (ec) {
        throw Error(files[f].path + ": cannot rename " + open[f].tmp +
                    " into place: " + ec.message());
      }
      open[f].tmp.clear();
    }
  } catch (...) {
    cleanup();
    throw;
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                       const TensorFill& fill) {
  write_safetensors_files(
      {{path, tensors}},
      [&](size_t, size_t tensor, uint64_t, uint8_t* dst, size_t bytes) {
        fill(tensor, dst, bytes);
      },
      std::numeric_limits<uint64_t>::max(), 1);
}

}  // namespace fp8kv
