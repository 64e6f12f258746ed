#!/usr/bin/env python3
"""GPU checks of the Python module (run by scripts/gpu-python-check; needs torch, a Hopper GPU).

  cuda  torch CUDA tensors against torch SDPA over the dequantized cache (float32), prefill and
        decode, all schemes, GQA 1/4/7/8, head_dim 64/128/256, lengths 1..33k; the GPU result
        against the CPU backend on the same tensors; zero-copy; work on a non-default stream and
        with an explicit stream= ordered correctly; refusals (mixed devices, missing host facts);
        b_req_idx / slots out of range skipped on the device and raised by fp8kv.synchronize().
  hf    fp8kv.hf on random Llama and Qwen2 models: calibration scales = abs-max/448 of the K/V
        transformers computes; BF16 logits through fp8kv vs transformers' SDPA; FP8 logits vs an
        emulation rounding K/V to e4m3 with the same scales.
Prints one line per check: "ok ..." or "FAIL ..."; exits 1 when one fails.
"""
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

import fp8kv

failures = 0
SEED = int(os.environ.get("FP8KV_TEST_SEED", "11"))


def check(cond, what):
    global failures
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    failures += 0 if cond else 1


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


TOL = {"bf16": 1e-2, "fp8-per-tensor": 1e-2, "fp8-per-head": 4e-2}  # fp8-per-head: Q and P in e4m3


def batch(scheme, hkv, group, d, seq_len, q_len, dev):
    g = torch.Generator(device=dev).manual_seed(SEED)
    B, hq = len(seq_len), hkv * group
    max_len = max(seq_len) + 3
    slots = sum(seq_len)
    pool_dtype = torch.bfloat16 if scheme == "bf16" else torch.uint8
    pool = torch.zeros(slots + 1, 2 * hkv, d, dtype=pool_dtype, device=dev)
    perm = torch.randperm(slots, generator=g, device=dev).to(torch.int32)
    table = torch.zeros(B, max_len, dtype=torch.int32, device=dev)
    n = 0
    for b, s in enumerate(seq_len):
        table[b, :s] = perm[n:n + s]
        n += s
    nks = hkv if scheme == "fp8-per-head" else 1
    ks = (torch.rand(nks, generator=g, device=dev) * 0.01 + 0.005) if scheme != "bf16" else None
    vs = (torch.rand(nks, generator=g, device=dev) * 0.01 + 0.005) if scheme != "bf16" else None
    kv = torch.randn(slots, 2 * hkv, d, generator=g, device=dev).to(torch.bfloat16)
    fp8kv.quantize_kv(kv, perm, pool, scheme, ks, vs)
    q = torch.randn(sum(q_len), hq, d, generator=g, device=dev).to(torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(q_len).cumsum(0)), dtype=torch.int32, device=dev)
    return dict(pool=pool, table=table, ks=ks, vs=vs, q=q, cu=cu,
                req=torch.arange(B, dtype=torch.int32, device=dev),
                seq=torch.tensor(seq_len, dtype=torch.int32, device=dev), hkv=hkv, hq=hq)


def reference(t, scheme, q_real, seq_len, q_len, causal=True):
    """SDPA in float32 over the dequantized pool (causal: keys up to each token's position)."""
    pool, hkv, hq = t["pool"], t["hkv"], t["hq"]
    real = pool.float() if scheme == "bf16" else pool.view(torch.float8_e4m3fn).float()
    if scheme != "bf16":
        ks = t["ks"].expand(hkv) if t["ks"].numel() == 1 else t["ks"]
        vs = t["vs"].expand(hkv) if t["vs"].numel() == 1 else t["vs"]
        real = real * torch.cat([ks, vs])[None, :, None]
    outs, row = [], 0
    for b, (s, ql) in enumerate(zip(seq_len, q_len)):
        rows = real[t["table"][b, :s].long()]  # [s, 2 hkv, d]
        k = rows[:, :hkv].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        v = rows[:, hkv:].transpose(0, 1).repeat_interleave(hq // hkv, 0)
        q = q_real[row:row + ql].transpose(0, 1)
        mask = torch.arange(s, device=q.device)[None, :] <= (s - ql + torch.arange(ql, device=q.device))[:, None]
        if not causal:
            mask = torch.ones_like(mask)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1))
        row += ql
    return torch.cat(outs)


def run(t, scheme, phase, seq_len, q_len, dev):
    """phase: decode, prefill (causal) or prefill-noncausal."""
    q, q_scale, q_real = t["q"], None, t["q"].float()
    if scheme == "fp8-per-head":
        q8 = torch.empty(q.shape, dtype=torch.uint8, device=dev)
        q_scale = torch.empty(len(seq_len), t["hkv"], device=dev)
        fp8kv.quantize_q(q, t["cu"], q8, q_scale)
        per_row = q_scale.repeat_interleave(torch.tensor(q_len, device=dev), 0)
        q_real = q8.view(torch.float8_e4m3fn).float() * per_row.repeat_interleave(
            t["hq"] // t["hkv"], 1)[:, :, None]
        q = q8
    out = torch.empty(t["q"].shape, dtype=torch.bfloat16, device=dev)
    ptr = out.data_ptr()
    args = (q, t["pool"], t["table"], t["req"], t["seq"])
    if phase == "decode":
        r = fp8kv.decode_attention(*args, scheme, t["ks"], t["vs"], q_scale=q_scale, out=out,
                                   max_seq_len=max(seq_len))
    else:
        r = fp8kv.prefill_attention(*args, t["cu"], scheme, t["ks"], t["vs"], q_scale=q_scale,
                                    out=out, max_q_len=max(q_len), max_seq_len=max(seq_len),
                                    causal=phase != "prefill-noncausal")
    assert r is out and out.data_ptr() == ptr
    return out, q_real, (q, q_scale)


def stage_cuda():
    dev = "cuda"
    for scheme in ["bf16", "fp8-per-tensor", "fp8-per-head"]:
        for d in [64, 128, 256]:
            for group in [1, 4, 7, 8]:
                hkv = 2
                long = 33000 if (d == 128 and group == 4) else 1500
                for phase, seq_len, q_len in [("decode", [1, 33, long], [1, 1, 1]),
                                              ("prefill", [40, 300, 1], [19, 300, 1]),
                                              ("prefill-noncausal", [40, 300, 1], [19, 300, 1])]:
                    t = batch(scheme, hkv, group, d, seq_len, q_len, dev)
                    out, q_real, _ = run(t, scheme, phase, seq_len, q_len, dev)
                    ref = reference(t, scheme, q_real, seq_len, q_len,
                                    causal=phase != "prefill-noncausal")
                    err = rel(out.float(), ref)
                    check(torch.isfinite(out.float()).all().item() and err < TOL[scheme],
                          f"{phase} {scheme} D={d} GQA={group} seq={seq_len}: rel err {err:.2e}")
    # The GPU against the CPU backend on the same tensors (torch CPU tensors over DLPack).
    for scheme in ["fp8-per-tensor", "fp8-per-head"]:
        seq_len, q_len = [50, 7], [1, 1]
        t = batch(scheme, 2, 4, 128, seq_len, q_len, dev)
        out, _, (q, q_scale) = run(t, scheme, "decode", seq_len, q_len, dev)
        cpu = fp8kv.decode_attention(q.cpu(), t["pool"].cpu(), t["table"].cpu(), t["req"].cpu(),
                                     t["seq"].cpu(), scheme, t["ks"].cpu(), t["vs"].cpu(),
                                     q_scale=None if q_scale is None else q_scale.cpu())
        err = rel(out.float().cpu(), cpu.float())
        check(cpu.dtype == torch.bfloat16 and err < TOL[scheme] / 2,
              f"decode {scheme}: CUDA vs CPU backend rel err {err:.2e}")
    # Streams: work queued on a non-default stream right after torch work on it.
    seq_len, q_len = [300, 1000], [1, 1]
    t = batch("fp8-per-tensor", 2, 4, 128, seq_len, q_len, dev)
    expected, _, _ = run(t, "fp8-per-tensor", "decode", seq_len, q_len, dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q2 = torch.empty_like(t["q"])
        torch.cuda._sleep(50_000_000)  # a long kernel before q2 is written on s
        q2.copy_(t["q"])
        t2 = dict(t, q=q2)
        got, _, _ = run(t2, "fp8-per-tensor", "decode", seq_len, q_len, dev)
    s.synchronize()
    check(torch.equal(got, expected), "decode on torch's current (non-default) stream is ordered")
    s2 = torch.cuda.Stream()
    q3 = torch.empty_like(t["q"])
    torch.cuda._sleep(50_000_000)
    q3.copy_(t["q"])  # on the default stream; the call below runs on s2 (explicit stream=)
    out3 = torch.empty_like(expected)
    fp8kv.decode_attention(q3, t["pool"], t["table"], t["req"], t["seq"], "fp8-per-tensor",
                           t["ks"], t["vs"], out=out3, max_seq_len=1000, stream=s2)
    s2.synchronize()
    check(torch.equal(out3, expected), "explicit stream=: the producer's work is ordered before it")
    # decode_order (a CUDA int32 tensor, longest first from the host's lengths): the same bits;
    # an entry outside [0, B) is raised by fp8kv.synchronize().
    order = torch.from_numpy(fp8kv.decode_order_longest_first(seq_len)).to(dev)
    out4 = torch.empty_like(expected)
    fp8kv.decode_attention(t["q"], t["pool"], t["table"], t["req"], t["seq"], "fp8-per-tensor",
                           t["ks"], t["vs"], out=out4, max_seq_len=1000, decode_order=order)
    torch.cuda.synchronize()
    check(order.tolist() == [1, 0] and torch.equal(out4, expected),
          "decode_order [1, 0]: the bits of the call without it")
    fp8kv.decode_attention(t["q"], t["pool"], t["table"], t["req"], t["seq"], "fp8-per-tensor",
                           t["ks"], t["vs"], out=out4, max_seq_len=1000,
                           decode_order=torch.tensor([1, 5], dtype=torch.int32, device=dev))
    try:
        fp8kv.synchronize()
        check(False, "decode_order entry 5 of 2 requests: no error at synchronize")
    except ValueError as e:
        check("decode_order[1] = 5 out of [0, num_requests 2)" in str(e),
              f"decode_order entry out of range raised at synchronize: {e}")
    # Index arrays on the GPU are checked by the kernels, not the host (that would synchronize
    # every call): a b_req_idx outside req_to_token's rows is skipped (nothing of it read) and
    # raised by fp8kv.synchronize(), once; the other requests are computed as without it.
    fp8kv.synchronize()
    check_cases = [("fp8-per-tensor", "decode", [300, 1000], [1, 1]),
                   ("fp8-per-head", "decode", [40, 300], [1, 1]),
                   ("bf16", "prefill", [40, 300], [19, 300]),
                   ("fp8-per-head", "prefill", [40, 300], [19, 300])]  # mma and wgmma prefill
    for scheme, phase, seq_len, q_len in check_cases:
        tb = batch(scheme, 2, 4, 128, seq_len, q_len, dev)
        good, _, _ = run(tb, scheme, phase, seq_len, q_len, dev)
        rows = tb["table"].shape[0]
        for bad_row in [rows, -1]:
            bad = tb["req"].clone()
            bad[1] = bad_row
            got, _, _ = run(dict(tb, req=bad), scheme, phase, seq_len, q_len, dev)
            want = f"{phase}_attention: b_req_idx[1] = {bad_row} out of [0, max_requests {rows})"
            try:
                fp8kv.synchronize()
                check(False, f"{phase} {scheme}: b_req_idx {bad_row} out of range not reported")
            except ValueError as e:
                same = torch.equal(got[:q_len[0]], good[:q_len[0]])
                check(want in str(e) and same,
                      f"{phase} {scheme}: b_req_idx {bad_row} raised at synchronize ({e}); "
                      f"request 0 unchanged: {same}")
        try:
            fp8kv.synchronize()
            check(True, f"{phase} {scheme}: the refusal is raised once")
        except ValueError as e:
            check(False, f"{phase} {scheme}: raised twice: {e}")
    # quantize_kv: a slot out of range writes nothing, raised the same way.
    tq = batch("fp8-per-tensor", 2, 4, 128, [5], [1], dev)
    before = tq["pool"].clone()
    num_slots = tq["pool"].shape[0] - 1
    kv_new = torch.randn(2, 4, 128, device=dev).to(torch.bfloat16)
    fp8kv.quantize_kv(kv_new, torch.tensor([0, num_slots], dtype=torch.int32, device=dev),
                      tq["pool"], "fp8-per-tensor", tq["ks"], tq["vs"])
    try:
        fp8kv.synchronize()
        check(False, "quantize_kv: slot out of range not reported")
    except ValueError as e:
        check(f"quantize_kv: token 1: slot {num_slots} out of [0, num_slots {num_slots})" in str(e)
              and torch.equal(tq["pool"], before), f"quantize_kv slot out of range: {e}")
    # float8 dtype accepted as the pool, where torch exports it over DLPack.
    try:
        out8 = fp8kv.decode_attention(t["q"], t["pool"].view(torch.float8_e4m3fn), t["table"],
                                      t["req"], t["seq"], "fp8-per-tensor", t["ks"], t["vs"],
                                      max_seq_len=1000)
        check(torch.equal(out8, expected), "pool as torch.float8_e4m3fn")
    except (BufferError, RuntimeError, TypeError) as e:
        print(f"skip float8_e4m3fn pool: {e}")
    # Refusals.
    for what, call, msg in [
        ("mixed devices", lambda: fp8kv.decode_attention(t["q"].cpu(), t["pool"], t["table"],
                                                         t["req"], t["seq"], "fp8-per-tensor",
                                                         t["ks"], t["vs"], max_seq_len=9), "is on"),
        ("missing max_seq_len", lambda: fp8kv.decode_attention(t["q"], t["pool"], t["table"],
                                                               t["req"], t["seq"], "fp8-per-tensor",
                                                               t["ks"], t["vs"]), "max_seq_len is required"),
    ]:
        try:
            call()
            check(False, f"refusal {what}")
        except ValueError as e:
            check(msg in str(e), f"refusal {what}: {e}")
    if torch.cuda.device_count() > 1:
        try:
            fp8kv.decode_attention(t["q"].to("cuda:1"), t["pool"], t["table"], t["req"], t["seq"],
                                   "fp8-per-tensor", t["ks"], t["vs"], max_seq_len=1000)
            check(False, "refusal tensor on another GPU")
        except ValueError as e:
            check("cuda:1" in str(e), f"refusal tensor on another GPU: {e}")


def stage_hf():
    import fp8kv.hf
    from transformers import (AttentionInterface, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    common = dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    for kind in ["llama", "qwen2"]:
        torch.manual_seed(SEED)
        cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
        model = (LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM)(cfg)
        # fp8kv.hf.cast: as model.to(...), with RoPE's inv_freq kept float32 (a plain cast rounds
        # it to bf16 and both sides of every comparison would drift with position).
        model = fp8kv.hf.cast(model, "cuda", torch.bfloat16).eval()
        rope = {n: b.dtype for n, b in model.named_buffers() if n.endswith("inv_freq")}
        check(rope and all(d == torch.float32 for d in rope.values()),
              f"{kind}: RoPE inv_freq float32 after the cast to bf16: {rope}")
        batches = [torch.randint(0, 1024, (2, 128), device="cuda") for _ in range(4)]
        # Independent abs-max: a plain wrapper of transformers' SDPA.
        amax = {}

        def grab(module, query, key, value, mask, **kw):
            a = torch.stack([key.abs().amax(dim=(0, 2, 3)), value.abs().amax(dim=(0, 2, 3))]).float()
            amax[module.layer_idx] = torch.maximum(amax.get(module.layer_idx, a), a)
            return sdpa_attention_forward(module, query, key, value, mask, **kw)

        AttentionInterface.register("grab", grab)
        model.set_attn_implementation("grab")
        with torch.no_grad():
            for b in batches:
                model(input_ids=b, use_cache=False)
        model.set_attn_implementation("sdpa")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kv_cache_calib.json")
            calib = fp8kv.hf.calibrate(model, batches, scheme="per-head", count=4, out=path)
            expected = torch.stack([amax[l].reshape(-1) for l in range(2)]) / 448
            got = torch.from_numpy(calib.scales)
            check(torch.allclose(got, expected.cpu(), rtol=1e-6, atol=0),
                  f"{kind}: calibration scales = abs-max / 448 (max diff {(got - expected.cpu()).abs().max():.2e})")
            prompt = torch.randint(0, 1024, (1, 200), device="cuda")
            with torch.no_grad():
                ref32 = fp8kv.hf.cast(model, torch.float32)(prompt).logits
                fp8kv.hf.cast(model, torch.bfloat16)
                ref = model(prompt).logits.float()
                bf16_err = rel(ref, ref32)
                cache = fp8kv.hf.Fp8kvCache(model, None, "bf16", max_len=256)
                with fp8kv.hf.serving(model, cache):
                    ours = model(prompt, use_cache=False).logits.float()
                err = rel(ours, ref32)
                check(err <= 2 * bf16_err + 1e-3,
                      f"{kind}: bf16 logits via fp8kv rel err {err:.2e} vs transformers bf16 {bf16_err:.2e}")
                for scheme in ["fp8-per-tensor", "fp8-per-head"]:
                    if scheme == "fp8-per-tensor":
                        calib_t = fp8kv.hf.calibrate(model, batches, scheme="per-tensor", count=4,
                                                     out=path)
                    else:
                        calib_t = fp8kv.hf.calibrate(model, batches, scheme="per-head", count=4, out=path)
                    cache = fp8kv.hf.Fp8kvCache(model, path, scheme, max_len=256)
                    with fp8kv.hf.serving(model, cache):
                        ours8 = model(prompt, use_cache=False).logits.float()
                    rank = fp8kv.slice_for_rank(calib_t, 1, 0)

                    def emulate(module, query, key, value, mask, **kw):
                        l = module.layer_idx
                        ks = torch.from_numpy(rank.k(l)).cuda().view(1, -1, 1, 1)
                        vs = torch.from_numpy(rank.v(l)).cuda().view(1, -1, 1, 1)
                        r = lambda x, s: ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
                        return sdpa_attention_forward(module, query, r(key, ks), r(value, vs), mask, **kw)

                    AttentionInterface.register("emulate", emulate)
                    model.set_attn_implementation("emulate")
                    emu = model(prompt, use_cache=False).logits.float()
                    model.set_attn_implementation("sdpa")
                    err8 = rel(ours8, emu)
                    check(torch.isfinite(ours8).all().item() and err8 < 3 * TOL[scheme],
                          f"{kind}: {scheme} logits vs e4m3 emulation rel err {err8:.2e}")
                out = fp8kv.hf.generate(model, prompt[:, :32], calib=path, scheme="fp8-per-head",
                                        max_new_tokens=8, do_sample=False)
                check(out.shape == (1, 40), f"{kind}: generate with an FP8 pool: {out[0, 32:].tolist()}")
                try:
                    fp8kv.hf.generate(model, prompt[:, :8], calib=None, scheme="fp8-per-head")
                    check(False, f"{kind}: FP8 generate without a calibration file refused")
                except ValueError as e:
                    check("calibration" in str(e), f"{kind}: FP8 generate without calibration refused")


if __name__ == "__main__":
    stage = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    {"cuda": stage_cuda, "hf": stage_hf}[stage]()
    print(f"{stage}: {failures} failed")
    sys.exit(1 if failures else 0)
