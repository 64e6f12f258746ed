"""fp8kv's Python module over torch CPU tensors (skipped where torch is not installed): the
binding takes exact torch.Tensor / nn.Parameter objects through torch's C DLPack export instead
of Tensor.__dlpack__ (the per-call cost of a decode step). Zero-copy, the same bits as NumPy
arrays, and the same refusals (nothing written)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fp8kv  # noqa: E402

HKV, HQ, D = 2, 8, 64


def bf16_tensor(x):
    bits = fp8kv.encode_bf16(np.ascontiguousarray(x, dtype=np.float32))
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def decode_args(seed=5, scheme="fp8-per-tensor"):
    rng = np.random.default_rng(seed)
    pool = torch.zeros(41, 2 * HKV, D, dtype=torch.uint8)
    ks = torch.tensor([0.011], dtype=torch.float32)
    vs = torch.tensor([0.009], dtype=torch.float32)
    slots = torch.arange(20, dtype=torch.int32)
    fp8kv.quantize_kv(bf16_tensor(rng.standard_normal((20, 2 * HKV, D))), slots, pool, scheme,
                      ks, vs)
    table = torch.arange(40, dtype=torch.int32).view(2, 20)
    return dict(q=bf16_tensor(rng.standard_normal((2, HQ, D))), kv_buffer=pool,
                req_to_token=table, b_req_idx=torch.tensor([1, 0], dtype=torch.int32),
                b_seq_len=torch.tensor([1, 20], dtype=torch.int32), scheme=scheme,
                k_scale=ks, v_scale=vs)


def as_numpy(args):
    """The same arguments as NumPy arrays (bf16 as uint16 bits)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 \
                else v.numpy()
        else:
            out[k] = v
    return out


def test_torch_tensors_are_written_in_place_and_match_numpy():
    args = decode_args()
    out = torch.full((2, HQ, D), 7.0, dtype=torch.bfloat16)
    ptr = out.data_ptr()
    r = fp8kv.decode_attention(**args, out=out)
    assert r is out and out.data_ptr() == ptr
    ref = fp8kv.decode_attention(**as_numpy(args))
    assert np.array_equal(out.view(torch.int16).numpy().view(np.uint16), ref)
    # Allocated like q when out is not given: a torch bf16 tensor.
    r2 = fp8kv.decode_attention(**args)
    assert r2.dtype == torch.bfloat16 and torch.equal(r2, out)


def test_parameters_and_views_with_an_offset():
    args = decode_args()
    # A Parameter (requires_grad: Tensor.__dlpack__ refuses it; reading it is fine) and a
    # contiguous view with a storage offset (layer 1 of a stacked pool).
    args["k_scale"] = torch.nn.Parameter(args["k_scale"].clone())
    stacked = torch.zeros(3, *args["kv_buffer"].shape, dtype=torch.uint8)
    stacked[1] = args["kv_buffer"]
    expected = fp8kv.decode_attention(**args)
    args["kv_buffer"] = stacked[1]
    assert torch.equal(fp8kv.decode_attention(**args), expected)


def test_a_tensor_subclass_takes_the_dlpack_protocol():
    class Sub(torch.Tensor):
        pass

    args = decode_args()
    expected = fp8kv.decode_attention(**args)
    args["req_to_token"] = args["req_to_token"].as_subclass(Sub)
    assert torch.equal(fp8kv.decode_attention(**args), expected)


@pytest.mark.parametrize("name,make,exc,message", [
    ("q", lambda a: a["q"].float(), TypeError, r"q: dtype float32, expected bfloat16"),
    ("b_req_idx", lambda a: a["b_req_idx"].long(), TypeError, r"b_req_idx: dtype int64"),
    ("req_to_token", lambda a: a["req_to_token"].t().contiguous().t(), ValueError,
     r"req_to_token: not contiguous"),
    ("kv_buffer", lambda a: a["kv_buffer"][:, :3].contiguous(), ValueError, r"dimension 1 must be 2 \* Hkv"),
    ("b_req_idx", lambda a: torch.tensor([1, 2], dtype=torch.int32), ValueError,
     r"b_req_idx\[1\] = 2 out of \[0, max_requests 2\)"),
    ("k_scale", lambda a: [0.1], TypeError, r"k_scale: expected an array that supports DLPack"),
])
def test_refusals_write_nothing(name, make, exc, message):
    args = decode_args()
    args[name] = make(args)
    out = torch.full((2, HQ, D), 7.0, dtype=torch.bfloat16)
    with pytest.raises(exc, match=message):
        fp8kv.decode_attention(**args, out=out)
    assert (out == 7.0).all()


def test_mixed_numpy_and_torch_cpu_arguments():
    args = decode_args()
    expected = fp8kv.decode_attention(**args)
    mixed = dict(args, req_to_token=args["req_to_token"].numpy())
    assert torch.equal(fp8kv.decode_attention(**mixed), expected)


def test_hf_cast_keeps_rope_inv_freq_float32():
    import fp8kv.hf

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            inv = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
            self.register_buffer("inv_freq", inv, persistent=False)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.rotary_emb = Rotary()

    model = Model()
    exact = model.rotary_emb.inv_freq.clone()
    assert not torch.equal(exact.to(torch.bfloat16).float(), exact)  # a plain cast rounds it
    out = fp8kv.hf.cast(model, torch.bfloat16)
    assert out is model and model.proj.weight.dtype == torch.bfloat16
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary_emb.inv_freq, exact)
    assert "inv_freq" in dict(model.rotary_emb.named_buffers())  # still a buffer
    assert "inv_freq" not in model.rotary_emb.state_dict()  # still not persistent
    with pytest.warns(UserWarning, match="inv_freq is not float32"):
        fp8kv.hf._warn_rounded_rope(Model().to(torch.bfloat16))
