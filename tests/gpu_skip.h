// The one skip of the GPU tests: on a machine without a usable GPU (CI) they skip, not fail.
#pragma once

#include <gtest/gtest.h>

#include "fp8kv/backend.h"

#define SKIP_WITHOUT_GPU() \
  if (!::fp8kv::cuda_available()) GTEST_SKIP() << "no Hopper GPU"
