# Type stubs of fp8kv (see __init__.py for the module's documentation).
#
# Shapes (LightLLM's tensors): kv_buffer [num_slots + 1, 2 * Hkv, D] uint8 e4m3 codes (or
# torch.float8_e4m3fn) for the FP8 schemes, bf16 for "bf16"; kv [T, 2 * Hkv, D] bf16;
# slots [T] int32; q [total_q, Hq, D] bf16 (fp8-per-head attention: uint8 e4m3 from quantize_q);
# req_to_token [max_requests, max_len] int32; b_req_idx, b_seq_len [B] int32;
# cu_seqlens_q [B + 1] int32; k_scale, v_scale float32 [Hkv] (per-head) or [1] (per-tensor);
# q_scale float32 [B, Hkv]; amax float32 [2 * Hkv] (quantize_kv: K heads then V heads) or [Hkv]
# (quantize_q: Q's running abs-max per KV head, for static Q scales). bf16 = torch.bfloat16, or uint16 bit
# patterns (NumPy). Every array must be dense row-major; all arrays of a call on one device.
from typing import Any, Optional

import numpy as np

from ._fp8kv import (CalibData as CalibData, Communicator as Communicator,
                     RankScales as RankScales, SlotAllocator as SlotAllocator,
                     cuda_available as cuda_available,
                     decode_bf16 as decode_bf16, decode_e4m3 as decode_e4m3,
                     decode_e5m2 as decode_e5m2,
                     decode_order_longest_first as decode_order_longest_first,
                     encode_bf16 as encode_bf16,
                     encode_e4m3 as encode_e4m3, encode_e5m2 as encode_e5m2,
                     load_calib as load_calib, parse_calib as parse_calib,
                     quantize_kv as quantize_kv, quantize_q as quantize_q,
                     scales_for_scheme as scales_for_scheme,
                     slice_for_rank as slice_for_rank, synchronize as synchronize,
                     write_calib as write_calib)
from . import _fp8kv

Array = Any
Stream = Any

__version__: str

def prefill_attention(q: Array, kv_buffer: Array, req_to_token: Array, b_req_idx: Array,
                      b_seq_len: Array, cu_seqlens_q: Array, scheme: str,
                      k_scale: Optional[Array] = None, v_scale: Optional[Array] = None, *,
                      q_scale: Optional[Array] = None, out: Optional[Array] = None,
                      max_q_len: Optional[int] = None, max_seq_len: Optional[int] = None,
                      softmax_scale: float = 0.0, split_kv_heads: int = 0,
                      stream: Optional[Stream] = None, causal: bool = True) -> Array:
    """Attention of each request's new tokens over the pool (causal, or with causal=False over
    all of the request's keys); fills and returns out [total_q, Hq, D] bf16 (allocated like q
    when None)."""

def decode_attention(q: Array, kv_buffer: Array, req_to_token: Array, b_req_idx: Array,
                     b_seq_len: Array, scheme: str, k_scale: Optional[Array] = None,
                     v_scale: Optional[Array] = None, *, q_scale: Optional[Array] = None,
                     out: Optional[Array] = None, max_seq_len: Optional[int] = None,
                     cu_seqlens_q: Optional[Array] = None, softmax_scale: float = 0.0,
                     split_kv_heads: int = 0, stream: Optional[Stream] = None,
                     decode_order: Optional[Array] = None) -> Array:
    """One new token per request (q [B, Hq, D]); fills and returns out [B, Hq, D] bf16.
    decode_order: [B] int32, a permutation in which the kernels take the requests (speed only)."""

class TorchDistributedCommunicator:
    def __init__(self, group: Any = None) -> None: ...
    def rank(self) -> int: ...
    def world_size(self) -> int: ...
    def all_gather(self, x: np.ndarray) -> np.ndarray: ...
    def all_reduce_max(self, x: np.ndarray) -> np.ndarray: ...
    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray: ...

class Observer(_fp8kv.Observer):
    def finalize(self, communicator: Optional[Communicator] = None,
                 architectures: str = "") -> CalibData:
        """Reduces over ranks (torch.distributed when initialized), scale = amax / 448."""
