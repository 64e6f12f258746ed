// FP8KV_API marks the public API: what the shared library (libfp8kv.so) exports. The library is
// compiled with -fvisibility=hidden, so everything without it stays internal to the library.
// The static library carries the same marks; they change nothing there.
#pragma once

#if defined(_WIN32)
#define FP8KV_API
#else
#define FP8KV_API __attribute__((visibility("default")))
#endif
