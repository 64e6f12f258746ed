#include "fp8kv/version.h"

namespace fp8kv {

const char* version() { return FP8KV_VERSION_STRING; }

}  // namespace fp8kv
