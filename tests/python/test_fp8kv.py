"""fp8kv's Python module over NumPy arrays on the CPU backend: codecs, quantize-on-write, Q
quantization, prefill and decode attention against a float64 NumPy reference, zero-copy, every
refusal (nothing written), the calibration file helpers and the observer.

Random data: the seed is FP8KV_TEST_SEED when set (printed on failure through the test ids)."""
import glob
import json
import os

import numpy as np
import pytest

import fp8kv

SEED = int(os.environ.get("FP8KV_TEST_SEED", "20240611"))
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def rng(request):
    # One stream per test, replayable from the printed seed.
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed} (FP8KV_TEST_SEED={SEED})")
    return np.random.default_rng(seed)


def bf16(x):
    return fp8kv.encode_bf16(np.ascontiguousarray(x, dtype=np.float32))


def f32(bits):
    return fp8kv.decode_bf16(bits).astype(np.float64)


def ptr(a):
    return a.__array_interface__["data"][0]


# ---- codecs -------------------------------------------------------------------------------------

def test_e4m3_every_code_round_trips():
    codes = np.arange(256, dtype=np.uint8)
    values = fp8kv.decode_e4m3(codes)
    assert values.dtype == np.float32 and values.shape == (256,)
    nan = np.isnan(values)
    assert sorted(codes[nan]) == [0x7F, 0xFF]  # e4m3fn: one NaN pattern per sign
    assert np.array_equal(fp8kv.encode_e4m3(values[~nan]), codes[~nan])
    assert values[0x7E] == 448.0 and values[0x01] == 2.0**-9


def test_e4m3_saturates_and_rounds_to_nearest_even():
    x = np.array([1000.0, -1000.0, np.inf, 464.0, 1.0 + 2.0**-4, 1.0 + 3 * 2.0**-4, np.nan],
                 dtype=np.float32)
    # 464 is halfway between 448 and 480 (beyond the range): saturates; 1 + 1/16 ties to 1
    # (even), 1 + 3/16 ties to 1.25 (even).
    expected = [0x7E, 0xFE, 0x7E, 0x7E, 0x38, 0x3A, 0x7F]
    assert fp8kv.encode_e4m3(x).tolist() == expected


def test_e5m2_every_code_round_trips():
    codes = np.arange(256, dtype=np.uint8)
    values = fp8kv.decode_e5m2(codes)
    finite = np.isfinite(values)
    assert np.array_equal(fp8kv.encode_e5m2(values[finite]), codes[finite])
    assert values[0x7B] == 57344.0 and np.isposinf(values[0x7C])
    assert fp8kv.encode_e5m2(np.array([np.inf], np.float32))[0] == 0x7B  # saturating


def test_bf16_matches_round_to_nearest_even(rng):
    x = rng.standard_normal(4096).astype(np.float32) * 100
    u = x.view(np.uint32).astype(np.uint64)
    expected = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    assert np.array_equal(fp8kv.encode_bf16(x), expected)
    assert np.array_equal(fp8kv.decode_bf16(expected), (expected.astype(np.uint32) << 16).view(np.float32))


def test_codec_fills_the_out_array_given():
    x = np.array([[0.5, -2.0], [448.0, 3.0]], dtype=np.float32)
    out = np.zeros((2, 2), dtype=np.uint8)
    before = ptr(out)
    r = fp8kv.encode_e4m3(x, out=out)
    assert r is out and ptr(out) == before
    assert np.array_equal(out, fp8kv.encode_e4m3(x))
    with pytest.raises(ValueError, match=r"out: shape \[4\], expected \[2, 2\]"):
        fp8kv.encode_e4m3(x, out=np.zeros(4, np.uint8))


# ---- fixtures of a small pool --------------------------------------------------------------------

HKV, HQ, D = 2, 8, 64


def make_pool(rng, scheme, num_slots=40):
    dtype = np.uint16 if scheme == "bf16" else np.uint8
    pool = np.zeros((num_slots + 1, 2 * HKV, D), dtype=dtype)
    if scheme in ("fp8-per-head", "fp8-per-head-bf16q"):
        k_scale = rng.uniform(0.005, 0.02, HKV).astype(np.float32)
        v_scale = rng.uniform(0.005, 0.02, HKV).astype(np.float32)
    elif scheme == "fp8-per-tensor":
        k_scale = np.array([0.011], np.float32)
        v_scale = np.array([0.009], np.float32)
    else:
        k_scale = v_scale = None
    return pool, k_scale, v_scale


def dequant_pool(pool, scheme, k_scale, v_scale):
    """[slots + 1, 2 * Hkv, D] float64 real values."""
    if scheme == "bf16":
        return f32(pool)
    if scheme == "fp8-e5m2":  # no scales
        return fp8kv.decode_e5m2(pool).astype(np.float64)
    vals = fp8kv.decode_e4m3(pool).astype(np.float64)
    k = np.broadcast_to(k_scale, (HKV,)).astype(np.float64)
    v = np.broadcast_to(v_scale, (HKV,)).astype(np.float64)
    return vals * np.concatenate([k, v])[None, :, None]


def write_tokens(rng, pool, scheme, k_scale, v_scale, slots):
    kv = bf16(rng.standard_normal((len(slots), 2 * HKV, D)))
    fp8kv.quantize_kv(kv, np.asarray(slots, np.int32), pool, scheme, k_scale, v_scale)
    return kv


def reference_attention(q, pool_real, table, req_idx, seq_len, cu, softmax_scale=None):
    """float64 causal attention: q [total_q, Hq, D] real values -> [total_q, Hq, D]."""
    out = np.zeros(q.shape)
    scale = softmax_scale or 1.0 / np.sqrt(D)
    group = HQ // HKV
    for b in range(len(seq_len)):
        q_len = cu[b + 1] - cu[b]
        slots = table[req_idx[b], : seq_len[b]]
        k = pool_real[slots, :HKV]  # [S, Hkv, D]
        v = pool_real[slots, HKV:]
        for i in range(q_len):
            pos = seq_len[b] - q_len + i
            for h in range(HQ):
                s = k[: pos + 1, h // group] @ q[cu[b] + i, h] * scale
                p = np.exp(s - s.max())
                out[cu[b] + i, h] = (p / p.sum()) @ v[: pos + 1, h // group]
    return out


def dense_attention(q, pool_real, table, req_idx, seq_len, cu):
    """float64 non-causal attention, as matrices: per request b, softmax(Q_b K_b^T / sqrt(D)) V_b
    over all seq_len[b] keys, no mask. q [total_q, Hq, D] real values -> [total_q, Hq, D]."""
    out = np.zeros(q.shape)
    group = HQ // HKV
    for b in range(len(seq_len)):
        slots = table[req_idx[b], : seq_len[b]]
        k = np.repeat(pool_real[slots, :HKV], group, axis=1)  # [S, Hq, D]
        v = np.repeat(pool_real[slots, HKV:], group, axis=1)
        qb = q[cu[b]:cu[b + 1]]  # [M, Hq, D]
        s = np.einsum("mhd,nhd->hmn", qb, k) / np.sqrt(D)  # [Hq, M, S]
        p = np.exp(s - s.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)
        out[cu[b]:cu[b + 1]] = np.einsum("hmn,nhd->mhd", p, v)
    return out


def rel_err(a, ref):
    return np.linalg.norm(a - ref) / np.linalg.norm(ref)


# ---- quantize-on-write ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["fp8-per-head", "fp8-per-tensor", "bf16", "fp8-e5m2",
                                    "fp8-per-head-bf16q"])
def test_quantize_kv_writes_the_slots_given_in_place(rng, scheme):
    pool, ks, vs = make_pool(rng, scheme)
    before = ptr(pool)
    slots = np.array([7, 3, 39, 0, 21], np.int32)
    kv = bf16(rng.standard_normal((5, 2 * HKV, D)))
    amax = np.zeros(2 * HKV, np.float32) if scheme != "bf16" else None
    fp8kv.quantize_kv(kv, slots, pool, scheme, ks, vs, amax=amax)
    assert ptr(pool) == before
    x = fp8kv.decode_bf16(kv)  # float32, exactly the bf16 values
    if scheme == "bf16":
        assert np.array_equal(pool[slots], kv)
    elif scheme == "fp8-e5m2":  # no scales: x rounded to e5m2 as it is
        assert np.array_equal(pool[slots], fp8kv.encode_e5m2(x))
        assert np.array_equal(amax, np.abs(x).max(axis=(0, 2)))
    else:
        scales = np.concatenate([np.broadcast_to(ks, (HKV,)), np.broadcast_to(vs, (HKV,))])
        expected = fp8kv.encode_e4m3(x / scales[None, :, None].astype(np.float32))
        assert np.array_equal(pool[slots], expected)
        assert np.array_equal(amax, np.abs(x).max(axis=(0, 2)))
    untouched = np.setdiff1d(np.arange(pool.shape[0]), slots)
    assert not pool[untouched].any()  # other slots and the padding slot stay zero


def test_quantize_kv_into_a_view_writes_the_base_array(rng):
    # A contiguous view with an offset (layer 1 of a [layers, slots + 1, 2 Hkv, D] array): the
    # kernel writes the base array at the view's place, no copy.
    base = np.zeros((3, 11, 2 * HKV, D), np.uint8)
    layer = base[1]
    slots = np.array([4, 9], np.int32)
    scale = np.ones(1, np.float32)
    kv = bf16(rng.uniform(1, 2, (2, 2 * HKV, D)))
    fp8kv.quantize_kv(kv, slots, layer, "fp8-per-tensor", scale, scale)
    assert base[1, [4, 9]].all() and not base[0].any() and not base[2].any()
    assert np.count_nonzero(base[1].any(axis=(1, 2))) == 2


# ---- Q quantization -------------------------------------------------------------------------------

def test_quantize_q_dynamic_and_static(rng):
    cu = np.array([0, 3, 4, 9], np.int32)
    q = bf16(rng.standard_normal((9, HQ, D)))
    q_fp8 = np.zeros((9, HQ, D), np.uint8)
    q_scale = np.zeros((3, HKV), np.float32)
    fp8kv.quantize_q(q, cu, q_fp8, q_scale)
    x = fp8kv.decode_bf16(q)
    group = HQ // HKV
    for b in range(3):
        rows = x[cu[b]:cu[b + 1]]
        for g in range(HKV):
            part = rows[:, g * group:(g + 1) * group]
            assert q_scale[b, g] == np.float32(np.abs(part).max()) / np.float32(448)
            assert np.array_equal(q_fp8[cu[b]:cu[b + 1], g * group:(g + 1) * group],
                                  fp8kv.encode_e4m3(part / q_scale[b, g]))
    static = np.array([0.5, 0.25], np.float32)
    fp8kv.quantize_q(q, cu, q_fp8, q_scale, static_scale=static)
    assert np.array_equal(q_scale, np.tile(static, (3, 1)))


def test_quantize_q_observes_amax_in_place(rng):
    """amax= [Hkv] is raised to Q's abs-max per KV head (every request, the group's heads, all
    D), with a static scale as well; the array given is the one updated; a wrong shape is refused
    before anything is written."""
    cu = np.array([0, 3, 4, 9], np.int32)
    q = bf16(rng.standard_normal((9, HQ, D)))
    q_fp8 = np.zeros((9, HQ, D), np.uint8)
    q_scale = np.zeros((3, HKV), np.float32)
    x = fp8kv.decode_bf16(q)
    group = HQ // HKV
    want = np.array([np.abs(x[:, g * group:(g + 1) * group]).max() for g in range(HKV)], np.float32)
    amax = np.array([0.0, 100.0], np.float32)
    fp8kv.quantize_q(q, cu, q_fp8, q_scale, amax=amax)
    assert np.array_equal(amax, np.maximum([0.0, 100.0], want).astype(np.float32))
    amax2 = np.zeros(HKV, np.float32)
    fp8kv.quantize_q(q, cu, q_fp8, q_scale, static_scale=np.array([0.5, 0.25], np.float32), amax=amax2)
    assert np.array_equal(amax2, want)
    bad = np.zeros(HKV + 1, np.float32)
    before = q_fp8.copy()
    q_fp8[:] = 0
    with pytest.raises(ValueError, match="amax"):
        fp8kv.quantize_q(q, cu, q_fp8, q_scale, amax=bad)
    assert not bad.any() and not q_fp8.any()
    assert before.any()


# ---- attention ------------------------------------------------------------------------------------

def make_batch(rng, pool, scheme, ks, vs, seq_len, q_len):
    """Requests with scattered slots, rows of req_to_token out of order, max_len > seq_len."""
    B = len(seq_len)
    max_len = max(seq_len) + 5
    table = np.full((B + 2, max_len), -1, np.int32)
    req_idx = rng.permutation(B + 2)[:B].astype(np.int32)
    free = rng.permutation(pool.shape[0] - 1).astype(np.int32)
    n = 0
    for b in range(B):
        table[req_idx[b], : seq_len[b]] = free[n:n + seq_len[b]]
        n += seq_len[b]
    for b in range(B):
        write_tokens(rng, pool, scheme, ks, vs, table[req_idx[b], : seq_len[b]])
    cu = np.concatenate([[0], np.cumsum(q_len)]).astype(np.int32)
    return table, req_idx, np.asarray(seq_len, np.int32), cu


# Tolerances: the output is bf16 (relative rounding 2^-9) and the reference reads the same
# dequantized cache; fp8-per-head also quantizes Q to e4m3 (taken into the reference through its
# decoded codes) and rounds P to e4m3 (relative error up to 2^-4 per probability, unbiased:
# CpuBackend.ErrorBoundsReport measures a few 1e-3), so it gets a looser bound.
TOLERANCE = {"bf16": 4e-3, "fp8-per-tensor": 4e-3, "fp8-per-head": 3e-2, "fp8-e5m2": 4e-3,
             "fp8-per-head-bf16q": 4e-3}
SCHEMES = ["bf16", "fp8-per-tensor", "fp8-per-head", "fp8-e5m2", "fp8-per-head-bf16q"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_matches_float64_reference(rng, scheme):
    pool, ks, vs = make_pool(rng, scheme, num_slots=80)
    seq_len, q_len = [9, 17, 1], [4, 17, 1]  # cached prefixes, a whole prompt, a single token
    table, req_idx, sl, cu = make_batch(rng, pool, scheme, ks, vs, seq_len, q_len)
    q = bf16(rng.standard_normal((cu[-1], HQ, D)))
    q_arg, q_scale, q_real = q, None, f32(q)
    if scheme == "fp8-per-head":
        q_arg = np.empty(q.shape, np.uint8)
        q_scale = np.empty((3, HKV), np.float32)
        fp8kv.quantize_q(q, cu, q_arg, q_scale)
        per_row = np.repeat(q_scale, np.diff(cu), axis=0)  # [total_q, Hkv]
        q_real = fp8kv.decode_e4m3(q_arg) * np.repeat(per_row, HQ // HKV, axis=1)[:, :, None]
    out = np.full(q.shape, 0xFFFF, np.uint16)
    r = fp8kv.prefill_attention(q_arg, pool, table, req_idx, sl, cu, scheme, ks, vs,
                                q_scale=q_scale, out=out)
    assert r is out
    ref = reference_attention(q_real, dequant_pool(pool, scheme, ks, vs), table, req_idx, sl, cu)
    err = rel_err(f32(out), ref)
    assert np.isfinite(f32(out)).all() and err < TOLERANCE[scheme], err


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_non_causal_matches_dense_reference(rng, scheme):
    pool, ks, vs = make_pool(rng, scheme, num_slots=80)
    seq_len, q_len = [9, 17, 1, 6], [4, 17, 1, 0]  # cached prefixes, a prompt, one token, empty
    table, req_idx, sl, cu = make_batch(rng, pool, scheme, ks, vs, seq_len, q_len)
    q = bf16(rng.standard_normal((cu[-1], HQ, D)))
    q_arg, q_scale, q_real = q, None, f32(q)
    if scheme == "fp8-per-head":
        q_arg = np.empty(q.shape, np.uint8)
        q_scale = np.empty((4, HKV), np.float32)
        fp8kv.quantize_q(q, cu, q_arg, q_scale)
        per_row = np.repeat(q_scale, np.diff(cu), axis=0)  # [total_q, Hkv]
        q_real = fp8kv.decode_e4m3(q_arg) * np.repeat(per_row, HQ // HKV, axis=1)[:, :, None]
    non_causal = fp8kv.prefill_attention(q_arg, pool, table, req_idx, sl, cu, scheme, ks, vs,
                                         q_scale=q_scale, causal=False)
    causal = fp8kv.prefill_attention(q_arg, pool, table, req_idx, sl, cu, scheme, ks, vs,
                                     q_scale=q_scale)
    pool_real = dequant_pool(pool, scheme, ks, vs)
    ref = dense_attention(q_real, pool_real, table, req_idx, sl, cu)
    err = rel_err(f32(non_causal), ref)
    assert np.isfinite(f32(non_causal)).all() and err < TOLERANCE[scheme], err
    # The causal call is another attention: far from the dense result, close to its own reference.
    assert rel_err(f32(causal), ref) > 10 * TOLERANCE[scheme]
    assert rel_err(f32(causal), reference_attention(q_real, pool_real, table, req_idx, sl, cu)) \
        < TOLERANCE[scheme]
    # The last new token of each request sees every key under both rules: the same bits.
    last = cu[1:][np.diff(cu) > 0] - 1
    assert np.array_equal(non_causal[last], causal[last])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decode_matches_float64_reference_and_allocates_out(rng, scheme):
    pool, ks, vs = make_pool(rng, scheme, num_slots=80)
    seq_len = [1, 33, 12, 20]
    table, req_idx, sl, cu = make_batch(rng, pool, scheme, ks, vs, seq_len, [1] * 4)
    q = bf16(rng.standard_normal((4, HQ, D)))
    q_arg, q_scale, q_real = q, None, f32(q)
    if scheme == "fp8-per-head":
        q_arg = np.empty(q.shape, np.uint8)
        q_scale = np.empty((4, HKV), np.float32)
        fp8kv.quantize_q(q, cu, q_arg, q_scale)
        q_real = fp8kv.decode_e4m3(q_arg) * np.repeat(q_scale, HQ // HKV, axis=1)[:, :, None]
    out = fp8kv.decode_attention(q_arg, pool, table, req_idx, sl, scheme, ks, vs,
                                 q_scale=q_scale, softmax_scale=0.1)
    assert out.dtype == np.uint16 and out.shape == q.shape
    ref = reference_attention(q_real, dequant_pool(pool, scheme, ks, vs), table, req_idx, sl, cu,
                              softmax_scale=0.1)
    assert rel_err(f32(out), ref) < TOLERANCE[scheme]
    # The same call with an explicit cu_seqlens_q and max_seq_len gives the same bits.
    out2 = np.zeros_like(out)
    fp8kv.decode_attention(q_arg, pool, table, req_idx, sl, scheme, ks, vs, q_scale=q_scale,
                           softmax_scale=0.1, out=out2, cu_seqlens_q=cu, max_seq_len=33)
    assert np.array_equal(out, out2)


def test_slot_allocator_pages_a_decoding_batch():
    # Four requests prefilled, then decoded a token each per step, as an engine grows them: with
    # pages every token of a request sits at page start + position % 64; LightLLM's token order
    # interleaves the same batch's slots.
    for policy in ("pages", "tokens"):
        alloc = fp8kv.SlotAllocator(64 * 20, policy)
        assert (alloc.num_slots, alloc.free_slots, alloc.policy) == (1280, 1280, policy)
        rows = [[] for _ in range(4)]
        def grow(counts):
            start = [len(r) for r in rows]
            last = [r[-1] if r else -1 for r in rows]
            slots = alloc.take(np.array(start, np.int32), np.array(last, np.int32),
                               np.array(counts, np.int32))
            assert slots.dtype == np.int32 and len(slots) == sum(counts)
            k = 0
            for r, c in zip(rows, counts):
                r.extend(slots[k:k + c].tolist())
                k += c
        grow([5, 64, 130, 0])
        for _ in range(150):
            grow([1, 1, 1, 1])
        live = [s for r in rows for s in r]
        assert len(set(live)) == len(live) == 1280 - alloc.free_slots
        paged = all(s % 64 == p % 64 and (p % 64 == 0 or s == r[p - 1] + 1)
                    for r in rows for p, s in enumerate(r))
        assert paged == (policy == "pages")
        alloc.give_back(np.array(rows[2], np.int32))
        assert alloc.free_slots == 1280 - len(live) + len(rows[2])


def test_slot_allocator_refusals_change_nothing():
    alloc = fp8kv.SlotAllocator(10)
    one = np.array([1], np.int32)
    with pytest.raises(ValueError, match="needs 11 new slots, 10 of 10 are free"):
        alloc.take(np.array([0], np.int32), np.array([-1], np.int32), np.array([11], np.int32))
    assert alloc.free_slots == 10
    with pytest.raises(ValueError, match="differ in length"):
        alloc.take(np.array([0, 0], np.int32), np.array([-1], np.int32), one)
    with pytest.raises(ValueError, match="entry 0 has start 0, last_slot 10, count 1"):
        alloc.take(np.array([0], np.int32), np.array([10], np.int32), one)
    with pytest.raises(ValueError, match="entry 0 has start 2147483647, last_slot -1, count 1"):
        alloc.take(np.array([2**31 - 1], np.int32), np.array([-1], np.int32), one)
    slots = alloc.take(np.array([0, 0], np.int32), np.array([-1, -1], np.int32),
                       np.array([2, 3], np.int32))
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]  # fewer than 64 slots: one by one
    with pytest.raises(ValueError, match="slot 7 is free already"):
        alloc.give_back(np.array([0, 7], np.int32))
    with pytest.raises(ValueError, match="slot 1 appears twice"):
        alloc.give_back(np.array([1, 1], np.int32))
    with pytest.raises(ValueError, match="outside the pool of 10"):
        alloc.give_back(np.array([10], np.int32))
    assert alloc.free_slots == 5  # every refused give_back freed nothing
    with pytest.raises(ValueError, match="policy must be 'pages' or 'tokens'"):
        fp8kv.SlotAllocator(10, "blocks")
    with pytest.raises(ValueError, match="num_slots"):
        fp8kv.SlotAllocator(0)


def test_decode_order_longest_first_and_in_decode(rng):
    # Whole tiles of 64 keys, longest first, one bucket keeping the index order.
    assert fp8kv.decode_order_longest_first([64, 65, 1, 0, 2047, 128]).tolist() == \
        [4, 1, 5, 0, 2, 3]
    order = fp8kv.decode_order_longest_first(np.array([3, 300, 70], np.int32))
    assert order.dtype == np.int32 and order.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="b_seq_len must be 1-D"):
        fp8kv.decode_order_longest_first(np.zeros((2, 2), np.int32))
    # Any permutation gives the bits of a decode without one.
    scheme = "fp8-per-tensor"
    pool, ks, vs = make_pool(rng, scheme, num_slots=80)
    seq_len = [1, 33, 12, 20]
    table, req_idx, sl, cu = make_batch(rng, pool, scheme, ks, vs, seq_len, [1] * 4)
    q = bf16(rng.standard_normal((4, HQ, D)))
    plain = fp8kv.decode_attention(q, pool, table, req_idx, sl, scheme, ks, vs)
    ordered = fp8kv.decode_attention(q, pool, table, req_idx, sl, scheme, ks, vs,
                                     decode_order=fp8kv.decode_order_longest_first(sl))
    assert np.array_equal(plain, ordered)
    # The caller's word on its slots only steers the CUDA plan: the same bits here.
    paged = fp8kv.decode_attention(q, pool, table, req_idx, sl, scheme, ks, vs,
                                   slots_in_pages=True)
    assert np.array_equal(plain, paged)
    # Not a permutation: refused by name, nothing written.
    out = np.zeros_like(plain)
    with pytest.raises(ValueError, match=r"batch.decode_order\[3\] = 1 repeats an earlier entry"):
        fp8kv.decode_attention(q, pool, table, req_idx, sl, scheme, ks, vs, out=out,
                               decode_order=np.array([1, 0, 2, 1], np.int32))
    with pytest.raises(ValueError, match=r"decode_order.*\[4\]"):
        fp8kv.decode_attention(q, pool, table, req_idx, sl, scheme, ks, vs, out=out,
                               decode_order=np.array([0, 1, 2, 3, 4], np.int32))
    assert not out.any()


# ---- refusals: the right exception, the message, nothing written -----------------------------------

class OnDevice:
    """A DLPack producer that says it lives elsewhere (device type, id)."""

    def __init__(self, array, device_type, device_id=0):
        self.array, self.device = array, (device_type, device_id)

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None):
        raise AssertionError("borrowed although the device check should have refused it")


@pytest.fixture
def qkv_args(rng):
    pool, ks, vs = make_pool(rng, "fp8-per-head", num_slots=8)
    kv = bf16(rng.standard_normal((3, 2 * HKV, D)))
    return dict(kv=kv, slots=np.array([1, 2, 3], np.int32), kv_buffer=pool,
                scheme="fp8-per-head", k_scale=ks, v_scale=vs)


REFUSALS = [
    ("kv", lambda a: a["kv"].view(np.int16), TypeError, r"kv: dtype int16, expected bfloat16"),
    ("kv", lambda a: np.zeros((3, 2 * HKV, D), np.float32), TypeError, r"kv: dtype float32"),
    ("slots", lambda a: a["slots"].astype(np.int64), TypeError, r"slots: dtype int64, expected int32"),
    ("kv_buffer", lambda a: a["kv_buffer"].view(np.int8), TypeError, r"kv_buffer: dtype int8"),
    ("k_scale", lambda a: a["k_scale"].astype(np.float64), TypeError, r"k_scale: dtype float64"),
    ("kv", lambda a: a["kv"][:, :HKV].copy(), ValueError, r"kv: shape \[3, 2, 64\], expected \[\*, 4, 64\]"),
    ("slots", lambda a: a["slots"][:2].copy(), ValueError, r"slots: shape \[2\], expected \[3\]"),
    ("k_scale", lambda a: np.ones(1, np.float32), ValueError, r"k_scale: shape \[1\], expected \[2\]"),
    ("kv_buffer", lambda a: np.zeros((9, 3, D), np.uint8), ValueError, r"dimension 1 must be 2 \* Hkv"),
    ("kv", lambda a: np.zeros((3, 2 * HKV, 2 * D), np.uint16)[:, :, ::2], ValueError, r"kv: not contiguous"),
    ("kv_buffer", lambda a: np.zeros((9, 2 * HKV, D, 2), np.uint8)[..., 0], ValueError, r"kv_buffer: not contiguous"),
    ("slots", lambda a: np.array([1, 8, 2], np.int32), ValueError, r"quantize_kv: token 1: slot 8 out of \[0, num_slots 8\)"),
    ("k_scale", lambda a: np.array([0.1, 0.0], np.float32), ValueError, r"scales.k\[1\] = 0 must be finite and > 0"),
    ("k_scale", lambda a: None, ValueError, r"needs k_scale and v_scale"),
    ("scheme", lambda a: "fp9", ValueError, r"fp9"),
    ("kv", lambda a: OnDevice(a["kv"], 2, 0), ValueError, r"quantize_kv: slots is on cpu but kv is on cuda:0: all tensors of a call must be on one"),
    ("amax", lambda a: OnDevice(np.zeros(4, np.float32), 2, 1), ValueError, r"amax is on cuda:1"),
    ("kv", lambda a: OnDevice(a["kv"], 4), ValueError, r"kv: DLPack device type 4 is not supported"),
    ("slots", lambda a: [1, 2, 3], TypeError, r"slots: expected an array that supports DLPack"),
]


@pytest.mark.parametrize("name,make,exc,message", REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_quantize_kv_refusals_write_nothing(qkv_args, name, make, exc, message):
    args = dict(qkv_args)
    args[name] = make(args)
    pool = args["kv_buffer"]
    snapshot = pool.copy()
    with pytest.raises(exc, match=message):
        fp8kv.quantize_kv(**args)
    assert np.array_equal(pool, snapshot)


def test_unsupported_head_dim_is_refused_by_the_kernel(rng):
    pool = np.zeros((9, 2 * HKV, 96), np.uint8)
    kv = bf16(rng.standard_normal((1, 2 * HKV, 96)))
    one = np.ones(HKV, np.float32)
    with pytest.raises(ValueError, match=r"quantize_kv: head_dim 96 not built: supported 64, 128, 256"):
        fp8kv.quantize_kv(kv, np.array([0], np.int32), pool, "fp8-per-head", one, one)
    assert not pool.any()


def test_attention_refusals_write_nothing(rng):
    pool, ks, vs = make_pool(rng, "fp8-per-tensor", num_slots=30)
    table, req_idx, sl, cu = make_batch(rng, pool, "fp8-per-tensor", ks, vs, [5, 9], [5, 2])
    q = bf16(rng.standard_normal((7, HQ, D)))
    good = dict(q=q, kv_buffer=pool, req_to_token=table, b_req_idx=req_idx, b_seq_len=sl,
                cu_seqlens_q=cu, scheme="fp8-per-tensor", k_scale=ks, v_scale=vs)
    cases = [
        (dict(q=bf16(np.ones((7, 5, D)))), ValueError, "num_q_heads 5 is not a positive multiple"),
        (dict(q=np.zeros((7, HQ, D), np.uint8)), TypeError, "q: dtype uint8, expected bfloat16"),
        (dict(q=bf16(np.ones((7, HQ, 128)))), ValueError, r"q: shape \[7, 8, 128\], expected \[\*, \*, 64\]"),
        (dict(b_req_idx=np.array([0, 99], np.int32)), ValueError, r"b_req_idx\[1\] = 99 out of \[0, max_requests 4\)"),
        (dict(b_seq_len=np.array([5, 1], np.int32)), ValueError, r"request 1: seq_len 1 not in \[q_len 2"),
        (dict(cu_seqlens_q=np.array([0, 5, 6], np.int32)), ValueError, r"cu_seqlens_q\[2\] = 6 but total_q is 7"),
        (dict(req_to_token=table.T.copy().T), ValueError, r"req_to_token: not contiguous"),
        (dict(scheme="fp8-per-head", kv_buffer=pool, q=np.zeros((7, HQ, D), np.uint8)), ValueError,
         r"needs q_scale"),
        (dict(max_q_len=1), ValueError, r"request 0 has q_len 5 > batch.max_q_len 1"),
    ]
    for change, exc, message in cases:
        out = np.full(change.get("q", q).shape, 0x1234, np.uint16)
        with pytest.raises(exc, match=message):
            fp8kv.prefill_attention(**{**good, **change}, out=out)
        assert (out == 0x1234).all(), message
    # A contiguous view that starts 2 bytes past a 16-byte boundary: the CUDA kernels copy and
    # store 16-byte pieces, so every backend refuses it by name.
    def misaligned(a):
        buf = np.empty(a.size + 8, a.dtype)
        start = ((2 - ptr(buf)) % 16) // a.itemsize
        view = buf[start:start + a.size].reshape(a.shape)
        view[...] = a
        assert ptr(view) % 16 == 2
        return view
    out = np.full(q.shape, 0x1234, np.uint16)
    with pytest.raises(ValueError, match=r"q is not 16-byte aligned"):
        fp8kv.prefill_attention(**{**good, "q": misaligned(q)}, out=out)
    assert (out == 0x1234).all()
    out = misaligned(np.full(q.shape, 0x1234, np.uint16))
    with pytest.raises(ValueError, match=r"o is not 16-byte aligned"):
        fp8kv.prefill_attention(**good, out=out)
    assert (out == 0x1234).all()
    out = np.full(q.shape, 0x1234, np.uint16)
    with pytest.raises(ValueError, match=r"q: 7 rows for 2 requests: decode takes exactly one"):
        fp8kv.decode_attention(q, pool, table, req_idx, sl, "fp8-per-tensor", ks, vs, out=out)
    assert (out == 0x1234).all()
    with pytest.raises(ValueError, match=r"total_q 7 for 2 requests: decode takes exactly one"):
        fp8kv.decode_attention(q, pool, table, req_idx, sl, "fp8-per-tensor", ks, vs, out=out,
                               cu_seqlens_q=cu)
    out = np.full((2, HQ, D), 0x1234, np.uint16)
    with pytest.raises(ValueError, match=r"out: shape \[2, 8, 64\], expected \[7, 8, 64\]"):
        fp8kv.prefill_attention(**good, out=out)
    assert (out == 0x1234).all()


# ---- calibration file ----------------------------------------------------------------------------

def test_write_and_load_calib_round_trip(tmp_path, rng):
    scales = rng.uniform(0.001, 0.1, (3, 8)).astype(np.float32)
    calib = fp8kv.CalibData(architectures="LlamaForCausalLM", quant_type="per_head",
                            num_layers=3, num_head=4, scales=scales)
    path = str(tmp_path / "kv_cache_calib.json")
    fp8kv.write_calib(path, calib)
    assert os.listdir(tmp_path) == ["kv_cache_calib.json"]  # no temp file left behind
    back = fp8kv.load_calib(path, arch="LlamaForCausalLM", num_layers=3, num_kv_heads=4,
                            scheme="per-head")
    assert np.array_equal(back.scales, scales)  # float32 values round-trip exactly
    assert back.quant_type == "per_head" and back.k_scale(2, 3) == scales[2, 3]
    assert back.v_scale(1, 0) == scales[1, 4]
    assert json.loads(back.to_json())["architectures"] == "LlamaForCausalLM"
    with pytest.raises(ValueError, match=r"num_layers"):
        fp8kv.load_calib(path, num_layers=4)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM"):
        fp8kv.load_calib(path, arch="Qwen2ForCausalLM")
    with pytest.raises(ValueError, match=r"per_head"):
        fp8kv.load_calib(path, scheme="per-tensor")


def test_slice_for_rank_per_head_and_per_tensor():
    scales = np.arange(1, 17, dtype=np.float32).reshape(2, 8) / 100  # 2 layers, H = 4
    calib = fp8kv.CalibData(architectures="X", quant_type="per_head", num_layers=2, num_head=4,
                            scales=scales)
    r = fp8kv.slice_for_rank(calib, tp=2, rank=1)
    assert r.heads_per_rank == 2
    assert np.array_equal(r.k(1), scales[1, 2:4]) and np.array_equal(r.v(1), scales[1, 6:8])
    assert r.kv.shape == (2, 4)
    with pytest.raises(ValueError):
        fp8kv.slice_for_rank(calib, tp=3, rank=0)
    t = fp8kv.CalibData(architectures="X", quant_type="per_tensor", num_layers=2, num_head=4,
                        scales=np.array([[0.1, 0.2], [0.3, 0.4]], np.float32))
    rt = fp8kv.slice_for_rank(t, tp=4, rank=3)
    assert rt.k(1).tolist() == [np.float32(0.3)] and rt.v(0).tolist() == [np.float32(0.2)]


def test_scales_for_scheme_broadcasts_a_per_tensor_file(tmp_path):
    t = fp8kv.CalibData(architectures="X", quant_type="per_tensor", num_layers=2, num_head=4,
                        scales=np.array([[0.1, 0.2], [0.3, 0.4]], np.float32))
    path = str(tmp_path / "pt.json")
    fp8kv.write_calib(path, t)
    loaded = fp8kv.load_calib(path, num_kv_heads=4, scheme="fp8-per-head")  # accepted as is
    assert loaded.quant_type == "per_tensor"
    for scheme in ("fp8-per-head", "fp8-per-head-bf16q"):
        r = fp8kv.scales_for_scheme(loaded, scheme, tp=2, rank=1)
        assert r.quant_type == "per_head" and r.broadcast_from_per_tensor
        assert r.heads_per_rank == 2
        assert np.array_equal(r.k(1), np.full(2, 0.3, np.float32))
        assert np.array_equal(r.v(0), np.full(2, 0.2, np.float32))
    same = fp8kv.scales_for_scheme(loaded, "fp8-per-tensor")
    assert same.quant_type == "per_tensor" and not same.broadcast_from_per_tensor
    h = fp8kv.CalibData(architectures="X", quant_type="per_head", num_layers=1, num_head=2,
                        scales=np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    with pytest.raises(ValueError, match=r"needs per_tensor scales, got per_head.*--reduce max"):
        fp8kv.scales_for_scheme(h, "fp8-per-tensor")


def test_every_bad_calibration_file_is_refused_with_its_name():
    files = sorted(glob.glob(os.path.join(SOURCE, "tests", "data", "calib", "bad_*.json")))
    assert len(files) >= 20
    for f in files:
        # LightLLM per-rank files (tp 4 or 8 over 2 KV heads) are bad only against the model's KV
        # heads: their copies of a head disagree (tests/data/calib/make_lightllm_fixtures.py).
        kv = 2 if os.path.basename(f).startswith("bad_lightllm_") else None
        with pytest.raises(ValueError, match=os.path.basename(f).replace(".", r"\.")):
            fp8kv.load_calib(f, num_kv_heads=kv)
    good = fp8kv.load_calib(os.path.join(SOURCE, "examples", "lightllm_per_tensor_qwen2.5_32b.json"))
    assert good.quant_type == "per_tensor" and good.scales.shape == (good.num_layers, 2)


# ---- observer ------------------------------------------------------------------------------------

def test_observer_warmup_count_and_finalize(rng):
    obs = fp8kv.Observer(num_layers=2, num_kv_heads=2, scheme="per-head", warmup=1, count=2)
    big = np.full(4, 1000.0, np.float32)
    a = rng.uniform(0, 10, (2, 2, 4)).astype(np.float32)  # [pass, layer, 2 Hkv]
    for layer in range(2):
        assert obs.wants(layer) is False
        obs.observe(layer, big)  # warmup: dropped
        for p in range(2):
            obs.observe(layer, a[p, layer])
        obs.observe(layer, big)  # past count: dropped
    assert obs.done()
    calib = obs.finalize(architectures="TestForCausalLM")
    assert calib.architectures == "TestForCausalLM" and calib.num_head == 2
    assert np.array_equal(calib.scales, a.max(axis=0) / np.float32(448))
    with pytest.raises(ValueError, match=r"amax: shape \[3\], expected \[4\]"):
        obs.observe(0, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"layer 2 out of range"):
        obs.observe(2, big)


def test_observer_refuses_non_finite_and_per_tensor_takes_the_max():
    obs = fp8kv.Observer(2, 2, scheme="per-tensor", count=1)
    obs.observe(0, np.array([1, 2, 3, 4], np.float32))
    obs.observe(1, np.array([8, 0, 0, 0], np.float32))
    calib = obs.finalize()
    assert calib.quant_type == "per_tensor"
    assert np.allclose(calib.scales, np.array([[2, 4], [8, 1 * 448]], np.float32) / 448)
    bad = fp8kv.Observer(1, 1, count=1)
    bad.observe(0, np.array([np.nan, 1], np.float32))
    with pytest.raises(ValueError, match=r"layer 0, K head 0: abs-max is not finite"):
        bad.finalize()


class TwoRanks:
    """Rank 0 of two; the other rank's table is given."""

    def __init__(self, other):
        self.other = other

    def rank(self):
        return 0

    def world_size(self):
        return 2

    def all_gather(self, x):
        return np.concatenate([x, self.other])

    def all_reduce_max(self, x):
        return np.maximum(x, self.other)


def test_observer_finalize_through_a_python_communicator():
    obs = fp8kv.Observer(1, 1, scheme="per-head", count=1)
    obs.observe(0, np.array([2.0, 4.0], np.float32))  # rank 0: head 0 (K, V)
    calib = obs.finalize(TwoRanks(np.array([8.0, 16.0], np.float32)))  # rank 1: head 1
    assert calib.num_head == 2
    assert np.array_equal(calib.scales, np.array([[2, 8, 4, 16]], np.float32) / np.float32(448))


def test_version_is_a_string():
    assert isinstance(fp8kv.__version__, str) and fp8kv.__version__


def test_e5m2_refuses_scales_and_bf16q_needs_them(rng):
    pool, _, _ = make_pool(rng, "fp8-e5m2")
    kv = bf16(rng.standard_normal((1, 2 * HKV, D)))
    one = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="fp8-e5m2 takes no k_scale / v_scale"):
        fp8kv.quantize_kv(kv, np.array([0], np.int32), pool, "fp8-e5m2", one, one)
    assert not pool.any()
    with pytest.raises(ValueError, match="needs k_scale and v_scale"):
        fp8kv.quantize_kv(kv, np.array([0], np.int32), pool, "fp8-per-head-bf16q")
    assert not pool.any()
