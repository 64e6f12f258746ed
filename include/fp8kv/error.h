// The one exception type of fp8kv. Every refusal (bad file, bad argument, bad shape) throws it
// with a message that names what is wrong and the values involved.
#pragma once

#include <stdexcept>
#include <string>

#include "fp8kv/export.h"

namespace fp8kv {

class FP8KV_API Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace fp8kv
