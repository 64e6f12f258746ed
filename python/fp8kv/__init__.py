"""fp8kv from Python: FP8 (E4M3) KV-cache kernels, the calibration observer and LightLLM's
``kv_cache_calib.json``, over tensors of any framework that speaks DLPack.

Tensors cross without copies: the kernels read and write the caller's own memory. NumPy arrays
and torch CPU tensors run on the CPU backend (the reference implementation); torch CUDA tensors
on the CUDA backend (Hopper, sm_90a), queued on the caller's stream -- ``stream=`` (a
``cudaStream_t`` as int, or a ``torch.cuda.Stream``), else torch's current stream of the
tensors' GPU -- with no device synchronization in the binding.

Index arrays on the GPU cannot be read on the host without a synchronization per call, so the
CUDA kernels check them on the device: a ``quantize_kv`` slot out of range writes nothing, a
``b_req_idx`` out of ``req_to_token``'s rows is skipped (that request's rows of ``out`` are
undefined); the first such refusal is raised as ``ValueError`` by the next
``fp8kv.synchronize()`` (call it where you would synchronize anyway: once per step, before
reading results). On the CPU backend they are refused at once, before anything is written.

The tensors mirror LightLLM's (shapes in the docstrings):
  * one layer's KV buffer ``kv_buffer [num_slots + 1, 2 * Hkv, D]`` -- K heads then V heads per
    slot; uint8 e4m3 codes (or torch.float8_e4m3fn) for the FP8 schemes, bf16 for ``"bf16"``.
    The last slot is padding, never written;
  * ``req_to_token [max_requests, max_len]`` int32 slot table, ``b_req_idx [B]``,
    ``b_seq_len [B]`` (cached + new tokens), ``cu_seqlens_q [B + 1]`` int32.

``SlotAllocator(num_slots, policy="pages")`` hands out a pool's slots for ``req_to_token``: a
request's tokens at positions 64k..64k+63 take one page of 64 consecutive slots, so that every
64-key tile the attention kernels read sits in consecutive slots (one tensor copy per warp instead
of one per row) however the batch's requests grow; ``policy="tokens"`` is LightLLM's order (any
free slot, the last freed first). ``take(start, last_slot, count)`` (int32 ``[B]`` each: a
request's first new position, the slot of its token before it or -1, its new tokens) returns the
new tokens' slots in batch order, all or nothing; ``give_back(slots)`` frees them.

bf16: NumPy has no bfloat16; a uint16 array holding bf16 bit patterns is taken as bf16
everywhere (``encode_bf16`` / ``decode_bf16`` convert float32 arrays). Torch's bfloat16 is
taken as is.

Schemes: ``"bf16"``, ``"fp8-e5m2"`` (e5m2 codes, no scales), ``"fp8-per-head-bf16q"`` (k/v scale
``[Hkv]``, bf16 q), ``"fp8-per-tensor"`` (k/v scale ``[1]``), ``"fp8-per-head"`` (k/v scale
``[Hkv]``, Q quantized per (request, KV head) by ``quantize_q``). A scale means
``real = fp8 * scale``. ``scales_for_scheme(calib, scheme, tp, rank)`` gives a rank's scales in
the form a scheme reads (a per_tensor file broadcast to every KV head for the per-head schemes).

Every refusal is an exception raised before any kernel runs and before anything is written:
``TypeError`` for a dtype, ``ValueError`` for a shape, stride, device or value, with the C++
side's message.
"""
from __future__ import annotations

from . import _fp8kv
from ._fp8kv import (  # noqa: F401  (re-exported)
    CalibData,
    RankScales,
    SlotAllocator,
    cuda_available,
    decode_bf16,
    decode_e4m3,
    decode_e5m2,
    decode_order_longest_first,
    encode_bf16,
    encode_e4m3,
    encode_e5m2,
    load_calib,
    parse_calib,
    quantize_kv,
    quantize_q,
    scales_for_scheme,
    slice_for_rank,
    synchronize,
    write_calib,
)

__version__ = _fp8kv.__version__

__all__ = [
    "CalibData", "Observer", "RankScales", "SlotAllocator", "TorchDistributedCommunicator",
    "cuda_available",
    "decode_attention", "decode_bf16", "decode_e4m3", "decode_e5m2", "decode_order_longest_first",
    "encode_bf16",
    "encode_e4m3", "encode_e5m2", "load_calib", "parse_calib", "prefill_attention",
    "quantize_kv", "quantize_q", "scales_for_scheme", "slice_for_rank", "synchronize",
    "write_calib", "__version__",
]


def _empty_like_out(q):
    """A bf16 output shaped like ``q`` in q's framework: torch.bfloat16 on q's device, or a
    NumPy uint16 (bf16 bits) array."""
    module = type(q).__module__
    if module.startswith("torch"):
        import torch

        return torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    import numpy as np

    return np.empty(q.shape, dtype=np.uint16)


def prefill_attention(q, kv_buffer, req_to_token, b_req_idx, b_seq_len, cu_seqlens_q, scheme,
                      k_scale=None, v_scale=None, *, q_scale=None, out=None, max_q_len=None,
                      max_seq_len=None, softmax_scale=0.0, split_kv_heads=0, stream=None,
                      causal=True):
    """Attention of each request's new tokens over the pool; returns ``out``.

    q            [total_q, Hq, D] bf16 (fp8-per-head: e4m3 codes from ``quantize_q``)
    kv_buffer    [num_slots + 1, 2 * Hkv, D] the layer's pool (e4m3 codes, or bf16)
    req_to_token [max_requests, max_len] int32; b_req_idx [B] int32; b_seq_len [B] int32
    cu_seqlens_q [B + 1] int32: request b's new tokens are rows cu[b]..cu[b+1] of q, the last
                 q_len of its b_seq_len[b] tokens
    k_scale, v_scale  float32 [Hkv] (per-head) or [1] (per-tensor); None for bf16
    q_scale      float32 [B, Hkv] (fp8-per-head only, from ``quantize_q``)
    out          [total_q, Hq, D] bf16, filled in place; allocated like q when None
    max_q_len, max_seq_len  host-side maxima; required for CUDA tensors (reading them from the
                 device would synchronize), computed from host tensors otherwise
    softmax_scale  0 means 1/sqrt(D)
    causal       True: new token i of request b sees the keys at positions <= its own
                 (b_seq_len[b] - q_len + i); False: every new token sees all b_seq_len[b] keys
                 of its request (encoder / bidirectional attention)
    """
    if out is None:
        out = _empty_like_out(q)
    _fp8kv.prefill_attention(q, kv_buffer, req_to_token, b_req_idx, b_seq_len, cu_seqlens_q,
                             out, scheme, k_scale, v_scale, q_scale, max_q_len, max_seq_len,
                             softmax_scale, split_kv_heads, stream, causal)
    return out


def decode_attention(q, kv_buffer, req_to_token, b_req_idx, b_seq_len, scheme, k_scale=None,
                     v_scale=None, *, q_scale=None, out=None, max_seq_len=None,
                     cu_seqlens_q=None, softmax_scale=0.0, split_kv_heads=0, stream=None,
                     decode_order=None, slots_in_pages=False):
    """Attention of one new token per request (the last of its b_seq_len[b]); returns ``out``.

    q            [B, Hq, D] bf16 (fp8-per-head: e4m3 codes from ``quantize_q``)
    kv_buffer    [num_slots + 1, 2 * Hkv, D]; req_to_token [max_requests, max_len] int32;
    b_req_idx, b_seq_len [B] int32; cu_seqlens_q [B + 1] optional (0, 1, ..., B)
    k_scale, v_scale, q_scale, softmax_scale as in ``prefill_attention``
    out          [B, Hq, D] bf16, filled in place; allocated like q when None
    max_seq_len  max of b_seq_len; required for CUDA tensors
    split_kv_heads  the KV heads decode plans its split for (0: Hkv); a tensor-parallel rank
                 passes the whole model's to get tp = 1's bits
    decode_order [B] int32, optional, beside the other tensors: a permutation of the requests in
                 which the kernels take them; ``decode_order_longest_first(host seq lens)`` makes
                 one, once a step for every layer. Only the speed depends on it (a batch of mixed
                 lengths ends evenly). An entry outside [0, B) is refused (on CUDA tensors at
                 the next ``synchronize``)
    slots_in_pages  True where each request's keys at positions 64k .. 64k + 63 sit in
                 consecutive slots (``SlotAllocator(policy="pages")``, or consecutive slots
                 per request). Only the speed depends on it: left False (LightLLM's token
                 allocator), a long batch that would leave each SM one CTA runs two an SM,
                 which scattered slots need and consecutive ones lose a few % to
    """
    if out is None:
        out = _empty_like_out(q)
    _fp8kv.decode_attention(q, kv_buffer, req_to_token, b_req_idx, b_seq_len, out, scheme,
                            k_scale, v_scale, q_scale, max_seq_len, cu_seqlens_q, softmax_scale,
                            split_kv_heads, stream, 1, decode_order, slots_in_pages)
    return out


class TorchDistributedCommunicator:
    """Collectives of ``Observer.finalize`` over ``torch.distributed`` (one process per rank).

    Arrays travel through a CPU tensor (gloo) or a tensor on the current CUDA device (nccl).
    The max is taken here over a gather, so that a NaN on any rank wins (the observer then
    refuses it) whatever the backend's reduction does with NaN.
    """

    def __init__(self, group=None):
        import torch
        import torch.distributed as dist

        self._torch, self._dist, self._group = torch, dist, group
        if dist.get_backend(group) == "nccl":
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device("cpu")

    def rank(self) -> int:
        return self._dist.get_rank(self._group)

    def world_size(self) -> int:
        return self._dist.get_world_size(self._group)

    def all_gather(self, x):
        t = self._torch.from_numpy(x).to(self._device)
        out = self._torch.empty(self.world_size() * t.numel(), dtype=t.dtype, device=self._device)
        self._dist.all_gather_into_tensor(out, t, group=self._group)
        return out.cpu().numpy()

    def all_reduce_max(self, x):
        return self.all_gather(x).reshape(self.world_size(), -1).max(axis=0)

    def all_reduce_sum(self, x):
        t = self._torch.from_numpy(x).to(self._device)
        self._dist.all_reduce(t, group=self._group)
        return t.cpu().numpy()


def _default_communicator():
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCommunicator()
    return None


class Observer(_fp8kv.Observer):
    """Calibration observer: the running abs-max of K and V per (layer, KV head).

    Observer(num_layers, num_kv_heads, scheme="per-head", warmup=0, count=4000,
             total_kv_heads=0)
      num_kv_heads    KV heads of this rank; total_kv_heads those of the whole model (0:
                      num_kv_heads x world size; smaller when heads are replicated over ranks)
      warmup, count   forward passes each layer skips, then observes
    observe(layer, amax)  one forward pass of one layer; amax float32 [2 * Hkv] (K heads then
                      V heads) on the host, e.g. from quantize_kv(..., amax=) or a tensor's
                      abs().amax(); passes in warmup or past count are counted and dropped
    finalize(communicator=None, architectures="") -> CalibData with scale = amax / 448
    """

    def finalize(self, communicator=None, architectures: str = "") -> CalibData:
        """Reduces over tensor-parallel ranks and returns the calibration (scale = amax/448,
        0 -> 1); ValueError names the layer and head of any non-finite abs-max.

        communicator: an object with rank(), world_size(), all_gather(x) and all_reduce_max(x)
        on float32 NumPy arrays; None uses torch.distributed when it is initialized with more
        than one rank (TorchDistributedCommunicator), else this process alone.
        """
        if communicator is None:
            communicator = _default_communicator()
        return self._finalize(communicator, architectures)
