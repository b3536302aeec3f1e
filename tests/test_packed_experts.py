"""pack_experts and moe_experts on packed (float and int8) experts: layout round trip, every instruction-set build
against the reference, int8 error bounds, errors."""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast._backends import cpu_isa, cpu_isas, set_cpu_isa
from netmerge_fast.dispatch import ACTIVATIONS
from tests.conftest import available_backends
from tests.test_moe_experts import make_inputs, tolerance

BACKENDS = available_backends(["torch", "cpu"])
ISAS = cpu_isas() if "cpu" in BACKENDS else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS or [None])
def isa(request):
    """Each instruction-set build this machine can run (the baseline one included)."""
    if request.param is None:
        pytest.skip("the C++ extension is not built")
    previous = cpu_isa()
    set_cpu_isa(request.param)
    yield request.param
    set_cpu_isa(previous)


def packed_vs_reference(args, kwargs, dtype, backend="cpu", **pack_kwargs):
    """moe_experts on the packed weights against the reference on the weights the packed object holds."""
    hidden, w_gate_up, w_down, weights, ids = args
    packed = nf.pack_experts(w_gate_up, w_down, **pack_kwargs)
    with torch.no_grad():
        out = nf.moe_experts(hidden, packed, None, weights, ids, backend=backend, **kwargs)
    unpacked = packed.unpack()
    f32 = {k: (v.float() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    expected = reference.moe_experts(hidden.float(), *(w.float() for w in unpacked), weights, ids, **f32)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    torch.testing.assert_close(out.float(), expected, **tolerance(dtype, expected))
    return out, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("layout", ["hf", "transposed", "interleaved"])
def test_pack_unpack_round_trip_is_exact(layout, gated, dtype, gen):
    if layout == "interleaved" and not gated:
        pytest.skip("interleaving needs gate and up rows")
    _, w_gate_up, w_down, *_ = make_inputs(gen, 1, 1, 5, 37, 19, dtype=dtype, gated=gated)[0]
    given_up, given_down = w_gate_up, w_down
    if layout == "interleaved":
        inter = w_down.shape[2]
        given_up = torch.stack([w_gate_up[:, :inter], w_gate_up[:, inter:]], dim=2).flatten(1, 2)
    if layout != "hf":
        given_up, given_down = given_up.transpose(1, 2), given_down.transpose(1, 2)
    packed = nf.pack_experts(
        given_up, given_down, transposed=layout != "hf", gate_up_interleaved=layout == "interleaved"
    )
    assert (packed.num_experts, packed.hidden_size, packed.intermediate_size, packed.gated) == (5, 37, 19, gated)
    up, down = packed.unpack()
    assert up.dtype == dtype and torch.equal(up, w_gate_up) and torch.equal(down, w_down)
    assert packed.nbytes >= (w_gate_up.numel() + w_down.numel()) * w_gate_up.element_size()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 2, 4, 16, 8), (1, 2, 4, 16, 8), (9, 3, 6, 33, 17), (70, 2, 8, 24, 40)],
                         ids=lambda s: "T{}-k{}-E{}-H{}-I{}".format(*s))  # fmt: skip
def test_float_packed_matches_reference_on_every_build(shape, dtype, isa, gen):
    args, kwargs = make_inputs(gen, *shape, dtype=dtype, routed_nowhere=0.1)
    packed_vs_reference(args, kwargs, dtype)


@pytest.mark.parametrize("pack", [{}, {"quantize": "int8"}, {"quantize": "int8", "group_size": 48}],
                         ids=["float", "int8", "int8-g48"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocked_prefill_matches_reference(dtype, pack, isa, gen):
    """~200 rows per expert: two row blocks per expert, K (700 in, 664 padded out) split into k blocks with a
    short last one, more panels per expert than one task's sums hold, and the spread prefetch of every tile."""
    args, kwargs = make_inputs(gen, 300, 2, 3, 700, 660, dtype=dtype, bias=True, routed_nowhere=0.02)
    packed_vs_reference(args, kwargs, dtype, **pack)


@pytest.mark.parametrize("pack", [{}, {"quantize": "int8"}, {"quantize": "int8", "group_size": 32}],
                         ids=["float", "int8", "int8-g32"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_panels_widened_once_per_block_give_the_tiles_bits(dtype, pack, isa, gen):
    """From 16 rows an expert's bfloat16 / int8 panels are widened to float once per k block and read by float
    tiles; below, each tile widens them itself. With one k block (K <= 512) and tiles of at least four rows (one
    accumulator set; not on the baseline build, whose tiles hold two) both sum in the same order: the same bits for
    the rows they share, and the reference's answer."""
    ids = torch.zeros(16, 1, dtype=torch.int32)
    args, kwargs = make_inputs(gen, 16, 1, 2, 200, 96, dtype=dtype, bias=True, ids=ids)
    hidden, w_gate_up, w_down, weights, _ = args
    wide, _ = packed_vs_reference(args, kwargs, dtype, **pack)
    short = [hidden[:15], w_gate_up, w_down, weights[:15], ids[:15]]
    in_tile, _ = packed_vs_reference(short, kwargs, dtype, **pack)
    if isa != "baseline":
        assert torch.equal(wide[:15], in_tile)


@pytest.mark.parametrize("pack", [{}, {"quantize": "int8"}, {"quantize": "int8", "group_size": 16}],
                         ids=["float", "int8", "int8-g16"])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 2, 5])
def test_decode_splits_each_expert_across_threads(T, dtype, pack, isa, gen):
    """Few rows on few experts (Mixtral decode): each expert's panels split into several tasks, the last one
    short, on the few-row tiles with several accumulator sets."""
    args, kwargs = make_inputs(gen, T, 2, 4, 200, 300, dtype=dtype, bias=True)
    packed_vs_reference(args, kwargs, dtype, **pack)


@pytest.mark.parametrize("pack", [{}, {"quantize": "int8", "group_size": 32}], ids=["float", "int8-g32"])
@pytest.mark.parametrize("T", [1, 3, 64])
def test_both_phases_in_one_region_on_any_thread_count(T, pack, isa, gen):
    """Phase B tasks wait for their own expert's phase A tasks only: the same bits on 1, 2 and 3 threads (3 is
    more than this machine's cores, so a waiting thread yields to the one it waits for), and the reference's
    answer, with many experts of two row blocks at T = 64."""
    args, kwargs = make_inputs(gen, T, 4, 16, 256, 520, dtype=torch.float32, bias=True, routed_nowhere=0.05)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(packed_vs_reference(args, kwargs, torch.float32, **pack)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])


@pytest.mark.parametrize("T", [3, 40])  # decode-like and prefill-like row counts per expert
@pytest.mark.parametrize("apply_weights_on_input", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_biases_and_weights_on_input(activation, gated, bias, apply_weights_on_input, T, gen):
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ extension is not built")
    if activation == "swiglu_oai" and not gated:
        pytest.skip("swiglu_oai is gated only")
    for dtype in (torch.float32, torch.bfloat16):
        args, kwargs = make_inputs(gen, T, 2, 5, 24, 12, dtype=dtype, gated=gated, bias=bias, routed_nowhere=0.1)
        kwargs.update(activation=activation, gated=gated, apply_weights_on_input=apply_weights_on_input)
        packed_vs_reference(args, kwargs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_answer_as_moe_experts_on_the_plain_weights(backend, gen):
    args, kwargs = make_inputs(gen, 33, 4, 16, 64, 48, bias=True, routed_nowhere=0.05)
    hidden, w_gate_up, w_down, weights, ids = args
    with torch.no_grad():
        plain = nf.moe_experts(*args, backend=backend, **kwargs)
        packed = nf.moe_experts(hidden, nf.pack_experts(w_gate_up, w_down), None, weights, ids, backend=backend,
                                **kwargs)  # fmt: skip
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_packed_on_one_build_runs_on_another(gen):
    """Panels are packed for the active instruction set's width; every build reads every width."""
    if len(ISAS) < 2:
        pytest.skip("one instruction-set build on this machine")
    args, kwargs = make_inputs(gen, 21, 3, 6, 40, 24, bias=True)
    hidden, w_gate_up, w_down, weights, ids = args
    previous = cpu_isa()
    try:
        for packing_isa in ISAS:
            set_cpu_isa(packing_isa)
            packed = nf.pack_experts(w_gate_up, w_down)
            for running_isa in ISAS:
                set_cpu_isa(running_isa)
                with torch.no_grad():
                    out = nf.moe_experts(hidden, packed, None, weights, ids, **kwargs)
                expected = reference.moe_experts(*args, **kwargs)
                torch.testing.assert_close(out, expected, **tolerance(torch.float32, expected))
    finally:
        set_cpu_isa(previous)


def _relative_error(out, expected):
    return ((out.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("group_size", [None, 16, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", [True, False])
def test_int8_kernel_matches_its_dequantized_weights_and_bounds_the_error(gated, dtype, group_size, isa, gen):
    args, kwargs = make_inputs(gen, 37, 2, 6, 48, 40, dtype=dtype, gated=gated, bias=True, routed_nowhere=0.05)
    kwargs["gated"] = gated
    out, _ = packed_vs_reference(args, kwargs, dtype, quantize="int8", group_size=group_size)
    hidden, w_gate_up, w_down, weights, ids = args
    exact = reference.moe_experts(
        hidden.float(),
        w_gate_up.float(),
        w_down.float(),
        weights,
        ids,
        **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kwargs.items()},
    )
    # Symmetric int8 rounds each weight by at most half a step of amax / 127: about 0.5-1% of the layer output
    # for Gaussian weights (less with smaller groups).
    assert _relative_error(out, exact) < (0.02 if dtype == torch.float32 else 0.03)


def test_int8_is_a_quarter_of_float32_and_matches_the_torch_backend(gen):
    args, kwargs = make_inputs(gen, 12, 2, 4, 64, 32, bias=True)
    hidden, w_gate_up, w_down, weights, ids = args
    packed = nf.pack_experts(w_gate_up, w_down, quantize="int8")
    float_packed = nf.pack_experts(w_gate_up, w_down)
    assert packed.nbytes < 0.3 * float_packed.nbytes
    assert packed.gate_up.dtype == torch.int8 and packed.gate_up_scales.dtype == torch.float32
    with torch.no_grad():
        outs = [nf.moe_experts(hidden, packed, None, weights, ids, backend=b, **kwargs) for b in BACKENDS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)


def test_int8_values_are_symmetric_per_channel(gen):
    w_gate_up = torch.randn(2, 16, 8, generator=gen)
    w_gate_up[0, 3] = 0.0  # an all-zero output channel
    w_down = torch.randn(2, 8, 8, generator=gen)
    packed = nf.pack_experts(w_gate_up, w_down, quantize="int8")
    q = packed.gate_up
    assert q.abs().max() == 127 and q.min() >= -127
    up, _ = packed.unpack()
    assert torch.equal(up[0, 3], torch.zeros(8))
    step = w_gate_up.abs().amax(-1, keepdim=True) / 127
    assert ((up - w_gate_up).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_slots_routed_nowhere_and_empty_batch(backend, gen):
    args, _ = make_inputs(gen, 4, 2, 3, 16, 8, ids=torch.full((4, 2), -1))
    hidden, w_gate_up, w_down, weights, ids = args
    packed = nf.pack_experts(w_gate_up, w_down, quantize="int8")
    with torch.no_grad():
        out = nf.moe_experts(hidden, packed, None, weights, ids, backend=backend)
        empty = nf.moe_experts(hidden[:0], packed, None, weights[:0], ids[:0], backend=backend)
    assert torch.equal(out, torch.zeros_like(hidden)) and empty.shape == (0, 16)


def test_errors_name_the_argument(gen):
    args, _ = make_inputs(gen, 4, 2, 3, 16, 8)
    hidden, w_gate_up, w_down, weights, ids = args
    packed = nf.pack_experts(w_gate_up, w_down)
    with pytest.raises(ValueError, match="w_down must be None"):
        nf.moe_experts(hidden, packed, w_down, weights, ids)
    with pytest.raises(ValueError, match="gated=False does not match"):
        nf.moe_experts(hidden, packed, None, weights, ids, gated=False)
    with pytest.raises(TypeError, match="packed experts' dtype"):
        nf.moe_experts(hidden.bfloat16(), packed, None, weights, ids)
    with pytest.raises(ValueError, match="H=16"):
        nf.moe_experts(hidden[:, :8], packed, None, weights, ids)
    with pytest.raises(ValueError, match="topk_ids must be in"):
        nf.moe_experts(hidden, packed, None, weights, ids + 10)
    # Checked by the kernel in the ids' own type: an int64 id past 2^32 must not wrap into range as int32.
    spread = torch.tensor([[0, 2]] * 4, dtype=torch.int32)
    for bad, low, high in ((spread.long() + 2**32, 2**32, 2**32 + 2), (spread.short() - 3, -3, -1)):
        with pytest.raises(ValueError, match=rf"topk_ids must be in \[-1, E=3\) .*got values in \[{low}, {high}\]"):
            nf.moe_experts(hidden, packed, None, weights, bad)
    with torch.no_grad():
        nowhere = nf.moe_experts(hidden, packed, None, weights, torch.full((4, 2), -1, dtype=torch.int16))
    assert torch.equal(nowhere, torch.zeros_like(hidden))
    with pytest.raises(ValueError, match="b_down must be"):
        nf.moe_experts(hidden, packed, None, weights, ids, b_down=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="quantize must be one of"):
        nf.pack_experts(w_gate_up, w_down, quantize="int4")
    with pytest.raises(ValueError, match="group_size needs"):
        nf.pack_experts(w_gate_up, w_down, group_size=32)
    with pytest.raises(ValueError, match="group_size must be in"):
        nf.pack_experts(w_gate_up, w_down, quantize="int8", group_size=0)
    with pytest.raises(TypeError, match="dtype must be"):
        nf.pack_experts(w_gate_up, w_down, dtype=torch.float64)
    with pytest.raises(ValueError, match="w_gate_up must be"):
        nf.pack_experts(w_gate_up[:, :5], w_down)
    with pytest.raises(ValueError, match="gate_up_interleaved=True needs"):
        nf.pack_experts(w_gate_up[:, :8], w_down, gate_up_interleaved=True)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_backward_through_packed_experts_is_a_clear_error(quantize, gen):
    args, _ = make_inputs(gen, 4, 2, 3, 16, 8)
    hidden, w_gate_up, w_down, weights, ids = args
    packed = nf.pack_experts(w_gate_up, w_down, quantize=quantize)
    with pytest.raises(NotImplementedError, match="inference only"):
        nf.moe_experts(hidden.requires_grad_(), packed, None, weights, ids)


# --- SparseMoE and integrations.hf: packed once, again when the weights change -----------------------------------

NATIVE = pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")


def _layer(seed, **kwargs):
    torch.manual_seed(seed)
    from netmerge_fast.nn import SparseMoE

    return SparseMoE(32, 24, 6, 2, **kwargs)


@NATIVE
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_moe_infers_on_packed_weights_and_follows_every_change(bias, gen):
    moe = _layer(0, bias=bias)
    x = torch.randn(3, 7, 32, generator=gen)
    with torch.no_grad():
        packed = moe(x)
    assert moe.experts.packed_nbytes > 0  # the no-grad call packed them
    torch.testing.assert_close(packed, moe(x).detach(), rtol=1e-5, atol=1e-5)  # with grad: the parameters
    # An optimizer step writes the parameters in place (their version counters move): packed again.
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.5)
    moe(x).square().sum().backward()
    optimizer.step()
    after_step = moe(x).detach()
    assert not torch.allclose(after_step, packed)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), after_step, rtol=1e-5, atol=1e-5)
    # load_state_dict copies into the parameters: packed again.
    other = _layer(1, bias=bias)
    moe.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(moe(x), other(x), rtol=1e-5, atol=1e-5)
        # .to() makes new parameters (and drops the old packed copy).
        moe.to(torch.bfloat16)
        assert moe.experts.packed_nbytes == 0
        torch.testing.assert_close(moe(x.bfloat16()).float(), other(x), rtol=3e-2, atol=3e-2)


@NATIVE
def test_sparse_moe_int8_error_backward_and_back_to_float(gen):
    moe = _layer(0)
    x = torch.randn(40, 32, generator=gen)
    with torch.no_grad():
        exact = moe(x)
        moe.quantize_experts("int8")
        assert moe.experts.packed().quantize == "int8"
        assert "quantize='int8'" in repr(moe.experts)
        int8 = moe(x)
        moe.quantize_experts("int8", group_size=8)
        grouped = moe(x)
    assert _relative_error(int8, exact) < 0.02 and _relative_error(grouped, exact) < 0.02
    with pytest.raises(NotImplementedError, match="int8 experts is inference only"):
        moe(x).sum().backward()
    moe.quantize_experts(None)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        moe.quantize_experts("int4")
    with pytest.raises(ValueError, match="group_size needs"):
        moe.quantize_experts(None, group_size=8)


@NATIVE
def test_hf_model_on_int8_experts_logits_and_greedy_tokens(gen):
    """The accuracy of int8 experts on a whole (tiny, random) model: the logits' relative change and how many of
    32 greedy tokens stay the same. Measured and printed (README: "int8 experts"); bounded loosely here."""
    pytest.importorskip("transformers", minversion="5.0")
    from netmerge_fast.integrations import hf
    from tests.test_hf_integration import input_ids, tiny_model

    model = tiny_model("qwen3_moe")
    ids = input_ids(length=16)
    with torch.no_grad():
        hf.enable(model)
        logits = model(ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        packed = [m.__dict__["_netmerge_plan"].packed.packed for m in model.modules() if "_netmerge_plan" in m.__dict__]
        assert packed and all(p is not None and p.quantize is None for p in packed)
        hf.enable(model, quantize_experts="int8")
        int8_logits = model(ids).logits
        int8_tokens = model.generate(ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    change = _relative_error(int8_logits, logits)
    same = (int8_tokens[0, 16:] == tokens[0, 16:]).float().mean().item()
    first_diff = next((i for i in range(32) if int8_tokens[0, 16 + i] != tokens[0, 16 + i]), 32)
    print(f"int8 experts: logits change {change:.4f} (relative), {same:.0%} of 32 greedy tokens kept, ", end="")
    print(f"first change at token {first_diff}")
    assert change < 0.05
    with pytest.raises(ValueError, match="quantize_experts must be one of"):
        hf.enable(model, quantize_experts="fp4")


# --- release_weights: one copy of the expert weights (the packed one) -------------------------------------------


def _weight_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


@NATIVE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_released_weights_are_freed_and_give_the_same_answers(bias, dtype, gen):
    import gc
    import weakref

    moe = _layer(0, bias=bias).to(dtype).eval()
    x = torch.randn(9, 32, generator=gen).to(dtype)
    with torch.no_grad():
        expected = moe(x)
        state = {k: v.clone() for k, v in moe.state_dict().items()}
        before = _weight_bytes(moe)
        originals = [weakref.ref(moe.experts.gate_up_proj), weakref.ref(moe.experts.down_proj)]
        moe.release_expert_weights()
        gc.collect()
        assert moe.experts.weights_released and all(ref() is None for ref in originals), "the weights are freed"
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(moe.experts, name)
            assert p.device.type == "meta" and p.dtype == dtype and p.shape == state[f"experts.{name}"].shape
        experts_bytes = sum(state[f"experts.{n}"].numel() for n in ("gate_up_proj", "down_proj")) * x.element_size()
        assert before - _weight_bytes(moe) == experts_bytes
        assert torch.equal(moe(x), expected), "the same packed copy runs"
        pack = moe.experts.packed()
        moe.release_expert_weights()  # released already: the same pack, nothing unpacked and packed again
        assert moe.experts.packed() is pack and moe.experts.weights_released
        got = moe.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state), "exact for float"
    moe.restore_expert_weights()
    assert not moe.experts.weights_released and moe.experts.gate_up_proj.requires_grad
    assert all(torch.equal(v, state[k]) for k, v in moe.state_dict().items())


@NATIVE
def test_released_weights_follow_load_state_dict_to_and_quantize(gen):
    import io

    moe, other = _layer(0).eval(), _layer(1).eval()
    x = torch.randn(20, 32, generator=gen)
    with torch.no_grad():
        moe.release_expert_weights()
        moe.load_state_dict(other.state_dict())  # restored, loaded, released again
        assert moe.experts.weights_released
        assert torch.equal(moe(x), other(x))
        moe.to(torch.bfloat16)
        other_bf16 = _layer(1).eval().to(torch.bfloat16)
        assert moe.experts.weights_released and moe.experts.gate_up_proj.dtype == torch.bfloat16
        assert torch.equal(moe(x.bfloat16()), other_bf16(x.bfloat16()))
        buffer = io.BytesIO()
        torch.save(moe, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.experts.weights_released and torch.equal(loaded(x.bfloat16()), moe(x.bfloat16()))
        moe.to(torch.float64)  # no packed kernel serves float64: the weights stay restored
        assert not moe.experts.weights_released and moe.experts.gate_up_proj.dtype == torch.float64
        moe.to(torch.float32)
        moe.release_expert_weights()
        moe.quantize_experts("int8", group_size=8)
        assert moe.experts.weights_released and moe.experts.packed().quantize == "int8"
        int8 = moe(x)
        packed = moe.experts.packed()
        dequantised = dict(zip(("experts.gate_up_proj", "experts.down_proj"), packed.unpack(), strict=True))
        state = moe.state_dict()
        assert all(torch.equal(state[k], v) for k, v in dequantised.items()), "int8: the dequantised weights"
        moe.quantize_experts(None)  # back to float, from the dequantised weights, still released
        assert moe.experts.weights_released and moe.experts.packed().quantize is None
        torch.testing.assert_close(moe(x), int8, rtol=1e-5, atol=1e-5)


@NATIVE
def test_released_weights_refuse_a_gradient_and_bad_weights(gen):
    moe = _layer(0)
    x = torch.randn(5, 32, generator=gen, requires_grad=True)
    moe.release_expert_weights()
    with pytest.raises(NotImplementedError, match=r"restore_weights\(\) first"):
        moe(x)
    moe.restore_expert_weights()
    moe(x).sum().backward()  # trains again on the restored parameters
    assert moe.experts.gate_up_proj.grad is not None
    moe.to(torch.float64)
    with pytest.raises(ValueError, match="gate_up_proj as a float32/bfloat16/float16 CPU tensor"):
        moe.release_expert_weights()
    cache = nf.packed_experts.PackCache()
    moe.to(torch.float32)
    nf.packed_experts.release_weights(moe.experts, cache)
    with pytest.raises(RuntimeError, match="released after packing"):
        cache.get(moe.experts.gate_up_proj, moe.experts.down_proj, quantize="int8")


@NATIVE
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_hf_enable_releases_the_expert_weights(family):
    """hf.enable(release_weights=True): the same logits as enable alone, the weight parameters freed, state_dict and
    disable give the weights back exactly (GPT-OSS: its transposed, interleaved layout), .to() after is refused."""
    pytest.importorskip("transformers", minversion="5.0")
    from netmerge_fast.integrations import hf
    from tests.test_hf_integration import input_ids, tiny_model

    model = tiny_model(family)
    ids = input_ids()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        hf.enable(model)
        expected = model(ids).logits
        report = hf.enable(model, release_weights=True)
        released = [m for m in model.modules() if nf.packed_experts.is_released(m)]
        assert report.experts and len(released) == len(report.experts)
        assert all(m.down_proj.device.type == "meta" for m in released)
        assert torch.equal(model(ids).logits, expected)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
        hf.disable(model)
        assert not any(nf.packed_experts.is_released(m) for m in model.modules())
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        hf.enable(model, release_weights=True)
        model.to(torch.bfloat16)
        with pytest.raises(RuntimeError, match="released after packing"):
            model(ids)
        with pytest.raises(ValueError, match="release_weights needs experts=True"):
            hf.enable(model, experts=False, release_weights=True)
        hf.disable(model)  # restores the weights, converted to bfloat16 by the .to() above
        assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="float32/bfloat16/float16 CPU tensors"):
            hf.enable(model.to(torch.float64), release_weights=True)
        assert getattr(model, "_netmerge_report", None) is None, "nothing patched"


@NATIVE
def test_released_weights_compile_fullgraph(gen):
    torch._dynamo.reset()
    moe = _layer(0).eval()
    x = torch.randn(7, 32, generator=gen)
    with torch.no_grad():
        eager = moe(x)
        moe.release_expert_weights()
        assert torch.equal(torch.compile(moe, fullgraph=True)(x), eager)


def test_module_attribute_reads_like_getattr():
    """The decode path's attribute reader (past nn.Module.__getattr__) gives what getattr gives, for every kind."""
    from netmerge_fast.packed_experts import module_attribute

    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(2))
            self.bias = None
            self.register_buffer("running", torch.zeros(2))
            self.child = torch.nn.Linear(2, 2)
            self.plain = torch.ones(1)

        @property
        def doubled(self):
            return 2 * self.weight

    m = Module()
    for name in ("weight", "bias", "running", "child", "plain"):
        assert module_attribute(m, name) is getattr(m, name)
    assert torch.equal(module_attribute(m, "doubled"), m.doubled)
    m.weight = torch.nn.Parameter(torch.randn(3))  # replaced: the registry's new entry
    assert module_attribute(m, "weight") is m.weight
    with pytest.raises(AttributeError, match="missing"):
        module_attribute(m, "missing")
    assert module_attribute(m, "missing", None) is None
    assert module_attribute(m, "running", None) is m.running
    assert torch.equal(module_attribute(m, "doubled", None), m.doubled)
