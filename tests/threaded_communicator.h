// The in-process Communicator lives in the library now (fp8kv/communicator.h); the tests'
// old names forward to it.
#pragma once

#include "fp8kv/threaded_communicator.h"

namespace fp8kv::testing {
using ::fp8kv::ThreadedGroup;
}  // namespace fp8kv::testing
