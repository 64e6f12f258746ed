// AttentionBatch::decode_order from the host's seq_len (backend.h): the longest-first order of
// decode_split.h, by whole tiles of kDecodeSplitAlign keys.
#include <string>
#include <vector>

#include "fp8kv/backend.h"
#include "fp8kv/error.h"
#include "kernels/decode_split.h"

namespace fp8kv {

std::vector<int32_t> decode_order_longest_first(const int32_t* seq_len, int num_requests) {
  if (num_requests < 0) {
    throw Error("decode_order_longest_first: num_requests " + std::to_string(num_requests) +
                " is negative");
  }
  if (num_requests > 0 && seq_len == nullptr) {
    throw Error("decode_order_longest_first: seq_len is null for " + std::to_string(num_requests) +
                " requests");
  }
  std::vector<int> tiles(static_cast<size_t>(num_requests));
  for (int b = 0; b < num_requests; ++b) {
    const int n = seq_len[b];
    tiles[b] = n > 0 ? (n - 1) / cuda::kDecodeSplitAlign + 1 : 0;
  }
  return cuda::decode_longest_first(tiles);
}

}  // namespace fp8kv
