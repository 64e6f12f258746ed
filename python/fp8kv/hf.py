"""fp8kv.hf: any Hugging Face transformers decoder calibrated and served with fp8kv.

Both paths go through transformers' attention-function interface (AttentionInterface), so they
need no per-model code: every attention layer of Llama, Qwen2, Qwen3, Mistral, Gemma, ... calls
the registered function with its post-RoPE query, key and value ([B, H, S, D]) and its
``module.layer_idx``.

  calibrate(model, batches, ...)   observes the abs-max of K and V of every layer with fp8kv's
                                   Observer (wrapping transformers' own SDPA attention, so the
                                   model computes exactly what it computes without us) and
                                   writes LightLLM's kv_cache_calib.json.
  generate(model, input_ids, calib=..., scheme=...)
                                   model.generate with the K/V of every layer written into an
                                   fp8kv pool (FP8 e4m3 with the calibrated scales, or bf16) by
                                   quantize_kv and attention computed over that pool by
                                   prefill_attention / decode_attention (CUDA tensors). Refused
                                   without a calibration file for the FP8 schemes, as in the CLI.

  cast(model, ...)                 model.to(...) that keeps RoPE's inv_freq in float32 (a plain
                                   .to(torch.bfloat16) rounds it, and positions then drift).

Importing this module needs neither torch nor transformers; calling it does.
Limits (refused with a ValueError): sliding-window and soft-capped attention layers, and padded
batches in generate (every request of a batch has the same length).
"""
from __future__ import annotations

import contextlib
import warnings

from . import (Observer, decode_attention, load_calib, prefill_attention, quantize_kv,
               quantize_q, scales_for_scheme, synchronize, write_calib)

__all__ = ["calibrate", "cast", "Fp8kvCache", "generate", "serving"]

_ROPE_BUFFERS = ("inv_freq", "original_inv_freq")


def cast(model, *args, **kwargs):
    """``model.to(*args, **kwargs)`` with every RoPE ``inv_freq`` buffer kept in float32 at its
    values before the cast, as ``from_pretrained(dtype=torch.bfloat16)`` leaves it (computed at
    init, never loaded). A plain ``.to(torch.bfloat16)`` rounds the frequencies (0.4%), and
    attention then drifts from the model's in proportion to position. Returns the model."""
    saved = {name: buf.detach().float().clone() for name, buf in model.named_buffers()
             if name.rsplit(".", 1)[-1] in _ROPE_BUFFERS}
    model = model.to(*args, **kwargs)
    for name, value in saved.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        setattr(module, attr, value.to(getattr(module, attr).device))
    return model


def _warn_rounded_rope(model):
    import torch

    rounded = [name for name, buf in model.named_buffers()
               if name.rsplit(".", 1)[-1] in _ROPE_BUFFERS and buf.dtype != torch.float32]
    if rounded:
        warnings.warn(f"fp8kv.hf: RoPE buffer {rounded[0]} is not float32 (the model was cast "
                      "with .to(dtype)?): positions drift with it; use fp8kv.hf.cast(model, "
                      "dtype) instead", stacklevel=3)


def _dims(model):
    """(architecture, num_layers, num_q_heads, num_kv_heads, head_dim) of a transformers model."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    archs = getattr(cfg, "architectures", None) or [type(model).__name__]
    hq = text.num_attention_heads
    hkv = getattr(text, "num_key_value_heads", None) or hq
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // hq
    return archs[0], text.num_hidden_layers, hq, hkv, head_dim


@contextlib.contextmanager
def _attention_function(model, name, fn):
    """Runs the body with `fn` as the model's attention function, then restores the old one."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, fn)
    try:  # masks as for SDPA (the fp8kv kernels are causal by construction and ignore them)
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(name, sdpa_mask)
    except ImportError:
        pass
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _layer_of(module):
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"fp8kv.hf: attention module {type(module).__name__} has no layer_idx: "
                         "cannot tell which layer's K/V it computes")
    return layer


def calibrate(model, batches, scheme="per-head", warmup=0, count=4000,
              out="kv_cache_calib.json", communicator=None):
    """Observes the post-RoPE K/V of every attention layer over `batches` and writes `out`.

    model    a transformers causal LM (any device and dtype)
    batches  an iterable of input_ids tensors [B, S] or of dicts of model inputs; each is one
             forward pass (use_cache=False) of every layer. Iteration stops once every layer has
             warmup + count passes. Pads in a batch are observed like any token.
    scheme   "per-head" or "per-tensor" (the file's quant_type)
    out      the calibration file (written atomically), or None to only return the CalibData
    communicator  as in Observer.finalize (torch.distributed when initialized)
    Returns the CalibData: scale = abs-max / 448 per (layer, KV head) or per layer.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    arch, num_layers, _, num_kv_heads, _ = _dims(model)
    _warn_rounded_rope(model)
    observer = Observer(num_layers, num_kv_heads, scheme=scheme, warmup=warmup, count=count)
    dropped = torch.zeros(2 * num_kv_heads, dtype=torch.float32)
    seen = set()

    def observe(module, query, key, value, attention_mask, **kwargs):
        layer = _layer_of(module)
        seen.add(layer)
        if observer.wants(layer):
            # key, value: [B, Hkv, S, D] as the model computed them (post-RoPE); amax propagates
            # NaN, which the observer then refuses naming the layer and head.
            amax = torch.cat([key.detach().abs().amax(dim=(0, 2, 3)),
                              value.detach().abs().amax(dim=(0, 2, 3))]).float().cpu()
            observer.observe(layer, amax.numpy())
        else:
            observer.observe(layer, dropped.numpy())  # counted (warmup / past count), not used
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with torch.no_grad(), _attention_function(model, "fp8kv_observe", observe):
        for batch in batches:
            if observer.done():
                break
            if isinstance(batch, dict):
                model(**batch, use_cache=False)
            else:
                model(input_ids=batch, use_cache=False)
    missing = sorted(set(range(num_layers)) - seen)
    if missing:
        raise ValueError(f"fp8kv.hf.calibrate: layers {missing} never called the attention "
                         "interface: this model's attention is not observable this way")
    calib = observer.finalize(communicator, architectures=arch)
    if out:
        write_calib(str(out), calib)
    return calib


class Fp8kvCache:
    """The K/V of a batch of `batch_size` requests in fp8kv pools, one per layer, on one GPU.

    Layout (LightLLM's): pool [batch_size * max_len + 1, 2 * Hkv, D] per layer, uint8 e4m3 for
    the FP8 schemes or bf16; request b's token at position p sits in slot b * max_len + p
    (req_to_token [batch_size, max_len] int32). Scales come from the calibration file, checked
    against the model (architecture, layers, KV heads, scheme).
    """

    def __init__(self, model, calib=None, scheme="fp8-per-head", batch_size=1, max_len=4096,
                 device=None):
        import torch

        arch, layers, hq, hkv, head_dim = _dims(model)
        _warn_rounded_rope(model)
        if scheme not in ("bf16", "fp8-per-tensor", "fp8-per-head", "fp8-per-head-bf16q",
                          "fp8-e5m2"):
            raise ValueError(f"fp8kv.hf: scheme '{scheme}': expected bf16, fp8-per-tensor, "
                             "fp8-per-head, fp8-per-head-bf16q or fp8-e5m2")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"fp8kv.hf: serving needs the model on a CUDA GPU, it is on {device}")
        self.scheme, self.batch_size, self.max_len = scheme, batch_size, max_len
        self.num_layers, self.num_kv_heads, self.head_dim = layers, hkv, head_dim
        self.k_scale = self.v_scale = [None] * layers
        if scheme in ("bf16", "fp8-e5m2"):
            if calib is not None:
                raise ValueError(f"fp8kv.hf: scheme {scheme} takes no calibration file "
                                 "(it has no scales)")
        else:
            if calib is None:
                raise ValueError(f"fp8kv.hf: scheme {scheme} needs a calibration file "
                                 "(kv_cache_calib.json; fp8kv.hf.calibrate writes one)")
            data = load_calib(str(calib), arch=arch, num_layers=layers, num_kv_heads=hkv,
                              scheme=scheme)
            rank = scales_for_scheme(data, scheme)  # a per_tensor file broadcast for per-head
            self.k_scale = [torch.from_numpy(rank.k(l)).to(device) for l in range(layers)]
            self.v_scale = [torch.from_numpy(rank.v(l)).to(device) for l in range(layers)]
        dtype = torch.bfloat16 if scheme == "bf16" else torch.uint8
        slots = batch_size * max_len
        self.pools = [torch.zeros(slots + 1, 2 * hkv, head_dim, dtype=dtype, device=device)
                      for _ in range(layers)]
        self.req_to_token = torch.arange(slots, dtype=torch.int32,
                                         device=device).view(batch_size, max_len)
        self.b_req_idx = torch.arange(batch_size, dtype=torch.int32, device=device)
        self.device = device
        self.reset()

    def reset(self):
        """Forgets every request's tokens (the next call starts at position 0)."""
        self.lengths = [0] * self.num_layers

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        """The attention function (transformers' interface): query [B, Hq, S, D]; key, value
        [B, Hkv, S_total, D] of which the last S are the new tokens. Returns ([B, S, Hq, D],
        None)."""
        import torch

        if kwargs.get("sliding_window") or kwargs.get("softcap"):
            raise ValueError("fp8kv.hf: sliding-window and soft-capped attention are not supported")
        layer = _layer_of(module)
        B, hq, S, D = query.shape
        if B != self.batch_size:
            raise ValueError(f"fp8kv.hf: batch of {B} requests, the cache holds {self.batch_size}")
        start = self.lengths[layer]
        end = start + S
        if end > self.max_len:
            raise ValueError(f"fp8kv.hf: {end} tokens exceed the cache's max_len {self.max_len}")
        pool = self.pools[layer]
        ks, vs = self.k_scale[layer], self.v_scale[layer]
        # New K/V: [B, Hkv, S, D] x 2 -> [B * S, 2 * Hkv, D] bf16 (K heads then V heads).
        kv = torch.cat([key[:, :, -S:], value[:, :, -S:]], dim=1)
        kv = kv.transpose(1, 2).reshape(B * S, 2 * self.num_kv_heads, D)
        kv = kv.to(torch.bfloat16).contiguous()
        slots = self.req_to_token[:, start:end].reshape(-1).contiguous()
        quantize_kv(kv, slots, pool, self.scheme, ks, vs)
        q = query.transpose(1, 2).reshape(B * S, hq, D).to(torch.bfloat16).contiguous()
        seq_len = torch.full((B,), end, dtype=torch.int32, device=self.device)
        cu = torch.arange(0, B * S + 1, S, dtype=torch.int32, device=self.device)
        q_scale = None
        if self.scheme == "fp8-per-head":
            q_fp8 = torch.empty(q.shape, dtype=torch.uint8, device=self.device)
            q_scale = torch.empty(B, self.num_kv_heads, dtype=torch.float32, device=self.device)
            quantize_q(q, cu, q_fp8, q_scale)
            q = q_fp8
        out = torch.empty(B * S, hq, D, dtype=torch.bfloat16, device=self.device)
        sm = float(scaling) if scaling is not None else 0.0
        if S == 1:
            # Each request's slots are one run (b * max_len + p): the plan's word for it.
            decode_attention(q, pool, self.req_to_token, self.b_req_idx, seq_len, self.scheme,
                             ks, vs, q_scale=q_scale, out=out, max_seq_len=end, softmax_scale=sm,
                             slots_in_pages=True)
        else:
            prefill_attention(q, pool, self.req_to_token, self.b_req_idx, seq_len, cu,
                              self.scheme, ks, vs, q_scale=q_scale, out=out, max_q_len=S,
                              max_seq_len=end, softmax_scale=sm)
        self.lengths[layer] = end
        return out.view(B, S, hq, D).to(query.dtype), None


@contextlib.contextmanager
def serving(model, cache):
    """Within the block, every forward of `model` writes K/V into `cache` and reads attention
    from it (cache.reset() first)."""
    cache.reset()
    with _attention_function(model, "fp8kv", cache.attention):
        yield cache


def generate(model, input_ids, calib=None, scheme="fp8-per-head", max_new_tokens=32,
             attention_mask=None, **kwargs):
    """model.generate(input_ids, ...) with K/V in an fp8kv pool and fp8kv's attention.

    input_ids [B, S] on the model's GPU, unpadded (refused when attention_mask has a zero).
    calib: the kv_cache_calib.json path (required for the FP8 schemes). Other arguments go to
    model.generate. Note: transformers' own KV cache still keeps its copy of K/V during
    generate; attention reads only the fp8kv pool.
    """
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError("fp8kv.hf.generate: padded batches are not supported (attention_mask "
                         "has zeros): give requests of one length")
    cache = Fp8kvCache(model, calib, scheme, batch_size=input_ids.shape[0],
                       max_len=input_ids.shape[1] + max_new_tokens, device=input_ids.device)
    with serving(model, cache):
        out = model.generate(input_ids, max_new_tokens=max_new_tokens,
                             attention_mask=attention_mask, **kwargs)
    synchronize(device=cache.device.index)  # raises a refusal the kernels recorded on the device
    return out
