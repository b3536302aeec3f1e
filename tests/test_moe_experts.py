"""moe_experts on every backend against netmerge_fast.reference: values, gradients, determinism, errors."""

import json
import math
import time

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.dispatch import ACTIVATIONS
from tests.conftest import ROUTING_EDGE_CASES, available_backends, device_for, routing_edge_case_ids

BACKENDS = available_backends(["torch", "cpu", "triton"])
FUSED = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETED = not torch.cuda.is_available()  # the triton backend runs under TRITON_INTERPRET=1


def interpreter_dot_path(backend, T, k, E, backward=False):
    """Whether this call runs a Triton tl.dot under the interpreter, which multiplies the raw bit patterns of
    bfloat16 operands: the tl.dot path runs when there are more slots than experts, and in every backward."""
    return backend == "triton" and INTERPRETED and (backward or T * k > E)


def skip_untrusted_bfloat16(backend, dtype, T, k, E, backward=False):
    if dtype == torch.bfloat16 and interpreter_dot_path(backend, T, k, E, backward):
        pytest.skip("interpreter: bfloat16 tl.dot is computed wrongly (float16 covers this path; the bfloat16 "
                    "case runs in the cuda-marked tests)")  # fmt: skip


def make_inputs(gen, T, k, E, H, inter, *, dtype=torch.float32, gated=True, bias=False, routed_nowhere=0.0, ids=None):
    """Inputs scaled like a trained layer (outputs of order 1), ids distinct per row unless given."""
    width = 2 * inter if gated else inter
    hidden = torch.randn(T, H, generator=gen)
    w_gate_up = torch.randn(E, width, H, generator=gen) * H**-0.5
    w_down = torch.randn(E, H, inter, generator=gen) * inter**-0.5
    weights = torch.rand(T, k, generator=gen)
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
        ids = torch.where(torch.rand(T, k, generator=gen) < routed_nowhere, -1, ids)
    biases = {}
    if bias:
        biases = {"b_gate_up": torch.randn(E, width, generator=gen) * 0.1, "b_down": torch.randn(E, H, generator=gen)}
    tensors = [t.to(dtype) for t in (hidden, w_gate_up, w_down)]
    return [*tensors, weights, ids.to(torch.int32)], {k_: v.to(dtype) for k_, v in biases.items()}


def _to(device, args, kwargs):
    return [a.to(device) for a in args], {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}


def tolerance(dtype, expected):
    scale = max(expected.abs().amax().item() if expected.numel() else 0.0, 1.0)
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 2e-5 * scale}
    return {"rtol": 2e-2, "atol": 2e-2 * scale}


def _activation(name, x):
    if name == "silu":
        return x / (1 + torch.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x.clamp_min(0)  # relu


def loop_moe_experts(hidden, w_gate_up, w_down, topk_weights, topk_ids, *, activation="silu", gated=True,
                     b_gate_up=None, b_down=None, apply_weights_on_input=False, transposed=False,
                     gate_up_interleaved=False):  # fmt: skip
    """An oracle independent of reference.py: every slot on its own, in float64, the activations written out."""
    d = torch.float64
    T, k = topk_ids.shape
    if transposed:
        w_gate_up, w_down = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)
    inter = w_down.shape[2]
    out = torch.zeros(T, hidden.shape[1], dtype=d)
    for t in range(T):
        for j in range(k):
            e, w = int(topk_ids[t, j]), float(topk_weights[t, j])
            if e < 0:
                continue
            h = w_gate_up[e].to(d) @ (hidden[t].to(d) * (w if apply_weights_on_input else 1.0))
            if b_gate_up is not None:
                h = h + b_gate_up[e].to(d)
            if gate_up_interleaved:  # gate even, up odd: back to [gate; up]
                h = torch.cat([h[0::2], h[1::2]])
            if activation == "swiglu_oai":
                g, u = h[:inter].clamp(max=7.0), h[inter:].clamp(-7.0, 7.0)
                a = (u + 1) * g * torch.sigmoid(1.702 * g)
            else:
                a = _activation(activation, h[:inter]) * h[inter:] if gated else _activation(activation, h)
            y = w_down[e].to(d) @ a
            if b_down is not None:
                y = y + b_down[e].to(d)
            out[t] += y if apply_weights_on_input else w * y
    return out


def check(backend, args, kwargs, dtype=torch.float32):
    """Ours on `backend` against the reference computed in float32 from the same (rounded) inputs; the torch
    backend (reference.py itself) against the loop oracle."""
    device = device_for(backend)
    dev_args, dev_kwargs = _to(device, args, kwargs)
    out = nf.moe_experts(*dev_args, backend=backend, **dev_kwargs)
    T, H = args[0].shape
    assert out.shape == (T, H) and out.dtype == args[0].dtype and out.device.type == device
    f32 = [a.float() if a.is_floating_point() else a for a in args]
    oracle = loop_moe_experts if backend == "torch" else reference.moe_experts
    expected = oracle(*f32, **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kwargs.items()}).float()
    torch.testing.assert_close(out.cpu().float(), expected, **tolerance(dtype, expected))
    return out


# (T, k, E, H, I): empty batch, one token, E=1, k=E, odd sizes, decode (few slots) and prefill (many).
SHAPES = [(0, 2, 4, 16, 8), (1, 2, 4, 16, 8), (5, 1, 1, 16, 8), (6, 4, 4, 16, 8), (9, 3, 6, 33, 17), (70, 2, 8, 24, 40)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-k{}-E{}-H{}-I{}".format(*s))
def test_shapes_and_dtypes(shape, dtype, backend, gen):
    skip_untrusted_bfloat16(backend, dtype, *shape[:3])
    args, kwargs = make_inputs(gen, *shape, dtype=dtype)
    check(backend, args, kwargs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [3, 40])  # decode and prefill paths
@pytest.mark.parametrize("apply_weights_on_input", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_biases_and_weights_on_input(activation, gated, bias, apply_weights_on_input, T, backend, gen):
    if activation == "swiglu_oai" and not gated:
        pytest.skip("swiglu_oai is gated only")
    args, kwargs = make_inputs(gen, T, 2, 5, 24, 12, gated=gated, bias=bias, routed_nowhere=0.1)
    if activation == "swiglu_oai":
        args[1].mul_(12)  # reach both clamps (gate > 7, |up| > 7)
    kwargs.update(activation=activation, gated=gated, apply_weights_on_input=apply_weights_on_input)
    check(backend, args, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ROUTING_EDGE_CASES)
def test_routing_edge_cases(case, backend, gen):
    T, k, E = 30, 2, 8
    ids = routing_edge_case_ids(case, gen, T, k, E)
    args, kwargs = make_inputs(gen, T, k, E, 16, 8, ids=ids)
    out = check(backend, args, kwargs)
    if case == "row_routed_nowhere":
        assert (out[4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    args, kwargs = make_inputs(gen, 20, 3, 6, 16, 8, bias=True)
    hidden, w_gate_up, w_down, weights, ids = args
    wide = torch.randn(20, 32, generator=gen)
    hidden = wide[:, ::2]
    w_gate_up = w_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    w_down = w_down.transpose(1, 2).contiguous().transpose(1, 2)
    weights = weights.t().contiguous().t()
    ids = ids.t().contiguous().t()
    assert not (hidden.is_contiguous() or w_gate_up.is_contiguous() or ids.is_contiguous())
    check(backend, [hidden, w_gate_up, w_down, weights, ids], kwargs)


def gpt_oss_layout(args, kwargs, transposed, interleaved):
    """The same experts in GPT-OSS's layouts: transposed ([E, H, 2I], [E, I, H]) and/or gate/up interleaved."""

    hidden, w_gate_up, w_down, weights, ids = args
    kwargs = dict(kwargs)
    if interleaved:
        w_gate_up = torch.stack(w_gate_up.chunk(2, dim=1), dim=2).flatten(1, 2)
        if "b_gate_up" in kwargs:
            kwargs["b_gate_up"] = torch.stack(kwargs["b_gate_up"].chunk(2, dim=1), dim=2).flatten(1)
    if transposed:
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    kwargs.update(transposed=transposed, gate_up_interleaved=interleaved)
    return [hidden, w_gate_up, w_down, weights, ids], kwargs


LAYOUTS = [(True, False), (False, True), (True, True)]


@pytest.mark.parametrize("transposed, interleaved", LAYOUTS)
def test_reference_reads_gpt_oss_layouts_as_the_plain_one(transposed, interleaved, gen):
    args, kwargs = make_inputs(gen, 9, 2, 5, 24, 12, bias=True)
    kwargs["activation"] = "swiglu_oai"
    args[1].mul_(12)  # both clamps
    expected = reference.moe_experts(*args, **kwargs)
    hf_args, hf_kwargs = gpt_oss_layout(args, kwargs, transposed, interleaved)
    # the layouts hold the same numbers: gate row i of expert e is column 2i (interleaved) of its transpose
    if transposed and interleaved:
        assert torch.equal(hf_args[1][:, :, 0::2], args[1][:, :12].transpose(1, 2))
    # the same function; the transposed matmuls may round differently
    torch.testing.assert_close(
        reference.moe_experts(*hf_args, **hf_kwargs), expected, **tolerance(torch.float32, expected)
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed, interleaved", LAYOUTS)
@pytest.mark.parametrize("activation", ["swiglu_oai", "silu"])
# decode (the K-major streaming kernel on cpu: ~1.5 and ~6 rows per expert) and prefill
@pytest.mark.parametrize("T", [3, 12, 40])
def test_gpt_oss_layouts_on_every_backend(T, activation, transposed, interleaved, dtype, backend, gen):
    skip_untrusted_bfloat16(backend, dtype, T, 3, 6)
    # Odd H and I: column tiles with tails in both projections.
    args, kwargs = make_inputs(gen, T, 3, 6, 33, 19, dtype=dtype, bias=True, routed_nowhere=0.1)
    kwargs["activation"] = activation
    if activation == "swiglu_oai":
        args[1].mul_(12)
    f32 = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
    plain = reference.moe_experts(*map(f32, args), **{k: f32(v) for k, v in kwargs.items()})
    out = check(backend, *gpt_oss_layout(args, kwargs, transposed, interleaved), dtype)
    torch.testing.assert_close(out.cpu().float(), plain, **tolerance(dtype, plain))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("transposed, interleaved", LAYOUTS)
@pytest.mark.parametrize("T", [3, 40])
def test_gpt_oss_layout_gradients_in_the_model_layout(T, transposed, interleaved, backend, gen):
    args, kwargs = make_inputs(gen, T, 2, 6, 24, 12, bias=True, routed_nowhere=0.1)
    args[1].mul_(6)
    args, kwargs = gpt_oss_layout(args, dict(kwargs, activation="swiglu_oai"), transposed, interleaved)
    upstream = torch.randn(T, 24, generator=gen)

    def grads(backend_):
        device = device_for(backend_)
        leaves = [a.to(device).requires_grad_(a.is_floating_point()) for a in args]
        extra = {k: v.to(device).requires_grad_() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        (nf.moe_experts(*leaves, backend=backend_, **extra) * upstream.to(device)).sum().backward()
        return [t.grad.cpu() for t in [*leaves[:4], extra["b_gate_up"], extra["b_down"]]]

    names = ["hidden", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down"]
    for name, g, w, a in zip(names, grads(backend), grads("torch"), [*args[:4], *kwargs.values()], strict=False):
        assert g.shape == w.shape == a.shape, name  # the gradient in the weights' own layout
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif("cpu" not in FUSED, reason="needs the cpu backend")
def test_gradcheck_cpu_fp64_gpt_oss_layout(gen):
    args, kwargs = make_inputs(gen, 7, 3, 4, 6, 5, dtype=torch.float64, bias=True, routed_nowhere=0.15)
    args[3] = args[3].double()
    args, kwargs = gpt_oss_layout(args, dict(kwargs, activation="silu"), True, True)
    leaves = [a.requires_grad_() for a in args[:4]] + [kwargs[k].requires_grad_() for k in ("b_gate_up", "b_down")]

    def f(hidden, w_gate_up, w_down, weights, b_gate_up, b_down):
        extra = dict(kwargs, b_gate_up=b_gate_up, b_down=b_down)
        return nf.moe_experts(hidden, w_gate_up, w_down, weights, args[4], backend="cpu", **extra)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("T", [2, 300])
def test_deterministic_bit_identical(backend, T, gen):
    """Repeated calls agree bit for bit, and with the reference (so they are not merely equally wrong)."""
    dtype = torch.bfloat16
    if backend == "triton" and INTERPRETED:
        T, dtype = min(T, 40), torch.float16
    args, kwargs = make_inputs(gen, T, 4, 8, 32, 16, dtype=dtype, bias=True)
    first = check(backend, args, kwargs, dtype)
    dev_args, dev_kwargs = _to(device_for(backend), args, kwargs)
    for _ in range(3):
        assert torch.equal(nf.moe_experts(*dev_args, backend=backend, **dev_kwargs), first)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True, "routed_nowhere": 0.2},
        {"apply_weights_on_input": True, "bias": True},
        {"activation": "gelu", "gated": False, "bias": True},
        {"activation": "swiglu_oai", "bias": True},
    ],
    ids=["plain", "bias_nowhere", "on_input", "ungated_gelu", "swiglu_oai"],
)
@pytest.mark.parametrize("T", [3, 40])
def test_gradients_match_reference(options, dtype, backend, T, gen):
    skip_untrusted_bfloat16(backend, dtype, T, 2, 6, backward=True)
    check_gradients(backend, dtype, (T, 2, 6, 24, 12), options, gen)


def check_gradients(backend, dtype, shape, options, gen):
    """Every gradient of ours on `backend` against autograd through the reference, from the same inputs."""
    T, k, E, H, inter = shape
    options = dict(options)
    make = {key: options.pop(key) for key in ("bias", "routed_nowhere", "gated") if key in options}
    args, kwargs = make_inputs(gen, T, k, E, H, inter, dtype=dtype, **make)
    kwargs.update(options, gated=make.get("gated", True))
    upstream = torch.randn(T, H, generator=gen).to(dtype)

    def grads(backend_, device):
        leaves = [a.to(device).requires_grad_(a.is_floating_point()) for a in args]
        extra = {k: v.to(device).requires_grad_() if torch.is_tensor(v) else v for k, v in kwargs.items()}
        out = nf.moe_experts(*leaves, backend=backend_, **extra)
        (out.float() * upstream.to(device).float()).sum().backward()
        tensors = [*leaves[:4], *(v for v in extra.values() if torch.is_tensor(v))]
        return [t.grad.cpu() for t in tensors]

    want = grads("torch", "cpu")
    got = grads(backend, device_for(backend))
    names = ["hidden", "w_gate_up", "w_down", "topk_weights", *(k for k, v in kwargs.items() if torch.is_tensor(v))]
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == w.dtype, name
        scale = max(w.abs().amax().item() if w.numel() else 0.0, 1.0)
        tol = {"rtol": 1e-4, "atol": 1e-5 * scale} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2 * scale}
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0, 3])
def test_nothing_routed_gives_zeros_and_zero_gradients(T, backend, gen):
    args, kwargs = make_inputs(gen, T, 2, 3, 8, 6, bias=True, ids=torch.full((T, 2), -1))
    device = device_for(backend)
    leaves = [a.to(device).requires_grad_(a.is_floating_point()) for a in args]
    biases = {k: v.to(device).requires_grad_() for k, v in kwargs.items()}
    out = nf.moe_experts(*leaves, backend=backend, **biases)
    assert out.shape == (T, 8) and (out == 0).all()
    out.sum().backward()
    for t in [*leaves[:4], *biases.values()]:
        assert t.grad is not None and (t.grad == 0).all()


@pytest.mark.skipif("cpu" not in FUSED, reason="needs the cpu backend")
@pytest.mark.parametrize(
    "options",
    [
        {"activation": a}
        for a in ACTIVATIONS
        if a != "relu"  # relu's kink makes finite differences unreliable
    ]
    + [{"gated": False, "bias": True, "apply_weights_on_input": True}],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_gradcheck_cpu_fp64(options, gen):
    options = dict(options)
    make = {key: options.pop(key) for key in ("bias", "gated") if key in options}
    args, kwargs = make_inputs(gen, 7, 3, 4, 6, 5, dtype=torch.float64, routed_nowhere=0.15, **make)
    args[3] = args[3].double()
    kwargs.update(options, gated=make.get("gated", True))
    names = [k for k, v in kwargs.items() if torch.is_tensor(v)]
    leaves = [a.requires_grad_() for a in args[:4]] + [kwargs[k].requires_grad_() for k in names]

    def f(hidden, w_gate_up, w_down, weights, *biases):
        extra = dict(kwargs, **dict(zip(names, biases, strict=True)))
        return nf.moe_experts(hidden, w_gate_up, w_down, weights, args[4], backend="cpu", **extra)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [{}, {"activation": "gelu_tanh", "gated": False, "apply_weights_on_input": True}, {"activation": "swiglu_oai"}],
    ids=["silu", "ungated_gelu_tanh_on_input", "swiglu_oai"],
)
def test_torch_backend_grouped_gemm_path(options, dtype, gen):
    """The torch backend's path for CUDA tensors (torch's grouped GEMM, no host sync), run on CPU tensors: values
    against the loop oracle, gradients against autograd through the reference."""
    from netmerge_fast import _torch_grouped

    if _torch_grouped.grouped_mm_function() is None:
        pytest.skip("this torch has no grouped GEMM")
    options = dict(options)
    gated = options.pop("gated", True)
    args, kwargs = make_inputs(gen, 20, 2, 5, 32, 16, dtype=dtype, gated=gated, bias=True, routed_nowhere=0.2)
    kwargs.update(options, gated=gated)
    assert _torch_grouped.supports(*args[:3])
    assert not _torch_grouped.supports(args[0][:, :30], args[1][..., :30], args[2][:, :30])  # 60-byte rows
    leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    extra = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    out = _torch_grouped.moe_experts(*leaves, **extra)
    f32 = [a.float() if a.is_floating_point() else a for a in args]
    expected = loop_moe_experts(*f32, **{k: (v.float() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    torch.testing.assert_close(out.float(), expected.float(), **tolerance(dtype, expected))
    upstream = torch.randn(out.shape, generator=gen)
    (out.float() * upstream).sum().backward()
    ref_leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
    ref_extra = {k: v.clone().requires_grad_() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    (reference.moe_experts(*ref_leaves, **ref_extra).float() * upstream).sum().backward()
    tensors = lambda ls, ex: [*ls[:4], *(v for v in ex.values() if torch.is_tensor(v))]
    for got, want in zip(tensors(leaves, extra), tensors(ref_leaves, ref_extra), strict=True):
        assert torch.isfinite(got.grad).all()
        scale = max(want.grad.abs().amax().item(), 1.0)
        tol = {"rtol": 1e-4, "atol": 1e-5 * scale} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2 * scale}
        torch.testing.assert_close(got.grad.float(), want.grad.float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transposed, interleaved", LAYOUTS)
def test_torch_backend_grouped_gemm_path_gpt_oss_layouts(transposed, interleaved, dtype, gen):
    """The CUDA torch path (run on CPU tensors) reads GPT-OSS's layouts: the plain layout's values, gradients in
    the weights' own layout as autograd through the reference gives them."""
    from netmerge_fast import _torch_grouped

    if _torch_grouped.grouped_mm_function() is None:
        pytest.skip("this torch has no grouped GEMM")
    args, kwargs = make_inputs(gen, 20, 2, 5, 32, 16, dtype=dtype, bias=True, routed_nowhere=0.2)
    kwargs["activation"] = "swiglu_oai"
    f32 = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
    plain = reference.moe_experts(*map(f32, args), **{key: f32(v) for key, v in kwargs.items()})
    args, kwargs = gpt_oss_layout(args, kwargs, transposed, interleaved)
    w_gate_up, w_down = (args[1].transpose(1, 2), args[2].transpose(1, 2)) if transposed else args[1:3]
    assert _torch_grouped.supports(args[0], w_gate_up, w_down)

    def run(moe_experts):
        leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        extra = {key: v.clone().requires_grad_() if torch.is_tensor(v) else v for key, v in kwargs.items()}
        out = moe_experts(*leaves, **extra)
        out.float().sum().backward()
        return out, [t.grad for t in [*leaves[:4], extra["b_gate_up"], extra["b_down"]]]

    out, grads = run(_torch_grouped.moe_experts)
    torch.testing.assert_close(out.float(), plain, **tolerance(dtype, plain))
    for got, want in zip(grads, run(reference.moe_experts)[1], strict=True):
        assert got.shape == want.shape
        scale = max(want.abs().amax().item(), 1.0)
        tol = {"rtol": 1e-4, "atol": 1e-5 * scale} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2 * scale}
        torch.testing.assert_close(got.float(), want.float(), **tol)


def _triton_kernels():
    if "triton" not in FUSED:
        pytest.skip("needs the triton backend")
    from netmerge_fast.triton_kernels import moe_configs, moe_experts

    return moe_configs, moe_experts


def split_k_table(E, H, inter, dtype, directory, monkeypatch):
    """A per-device table in $NETMERGE_TRITON_CONFIGS for this layer: BLOCK_M 16, both GEMMs' K loops split 3 ways."""
    moe_configs, _ = _triton_kernels()
    tiles = {"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2, "num_warps": 4, "num_stages": 2, "SPLIT_K": 3}
    entry = {"16": {"BLOCK_M": 16, "up": tiles, "down": tiles}}
    capability, _ = moe_configs.device_properties(torch.device(device_for("triton")))
    table = {moe_configs.layer_key(E, 2 * inter, H, dtype): entry}
    moe_configs.table_path(capability, directory).write_text(json.dumps(table))
    monkeypatch.setenv("NETMERGE_TRITON_CONFIGS", str(directory))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_config_table_and_split_k(dtype, gen, tmp_path, monkeypatch):
    """A per-device table in $NETMERGE_TRITON_CONFIGS serves its layer (here BLOCK_M 16 and both GEMMs' K loops
    split 3 ways, reduced in a fixed order): values and gradients as the reference, deterministic."""
    _, kernels = _triton_kernels()
    T, k, E, H, inter = 12, 2, 4, 64, 40
    split_k_table(E, H, inter, dtype, tmp_path, monkeypatch)
    config = kernels.launch_config(T * k, E, H, inter, dtype=dtype, device=torch.device(device_for("triton")))
    assert config["BLOCK_M"] == 16 and config["up"]["SPLIT_K"] == config["down"]["SPLIT_K"] == 3
    # H = 64: 4 K steps in splits of 2, 2 and none; I = 40: 3 steps of 16, the last one ragged.
    assert config["up"]["EVEN_K"] and not config["down"]["EVEN_K"]
    args, kwargs = make_inputs(gen, T, k, E, H, inter, dtype=dtype, bias=True, routed_nowhere=0.1)
    first = check("triton", args, kwargs, dtype)
    assert torch.equal(nf.moe_experts(*args, backend="triton", **kwargs), first)
    check_gradients("triton", dtype, (T, k, E, H, inter), {"bias": True}, gen)


def test_triton_tuner_writes_a_table_the_kernels_read(gen, tmp_path, monkeypatch):
    """moe_configs.tune (triton.autotune over candidates; timed here by a CPU clock, through the interpreter)
    picks tiles for a layer; save writes them; the launcher reads them back and computes with them."""
    moe_configs, kernels = _triton_kernels()

    def cpu_timer(call, quantiles):
        start = time.perf_counter()
        call()
        return [(time.perf_counter() - start) * 1e3] * len(quantiles)

    E, H, inter, device = 4, 32, 16, torch.device(device_for("triton"))
    candidates = [
        {"BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
    ]
    entry = moe_configs.tune(E, H, inter, torch.float32, buckets=(4,), block_ms=(16, 32), candidates=candidates,
                             device=device, do_bench=cpu_timer)  # fmt: skip
    assert set(entry) == {"4"} and entry["4"]["BLOCK_M"] in (16, 32)
    assert entry["4"]["up"] in candidates and entry["4"]["down"] in candidates
    capability, _ = moe_configs.device_properties(device)
    moe_configs.save(entry, E, 2 * inter, H, torch.float32, capability, tmp_path)
    monkeypatch.setenv("NETMERGE_TRITON_CONFIGS", str(tmp_path))
    config = kernels.launch_config(16, E, H, inter, dtype=torch.float32, device=device)
    assert config["BLOCK_M"] == entry["4"]["BLOCK_M"] and config["up"]["BLOCK_N"] == entry["4"]["up"]["BLOCK_N"]
    args, kwargs = make_inputs(gen, 8, 2, E, H, inter, bias=True)
    check("triton", args, kwargs)


def test_triton_chunks_long_inference_calls(gen, monkeypatch):
    """Inference calls above CHUNK_TOKENS run chunk by chunk (here chunks of 5 tokens, the last one short)."""
    _, kernels = _triton_kernels()
    monkeypatch.setattr(kernels, "CHUNK_TOKENS", 5)
    args, kwargs = make_inputs(gen, 13, 2, 4, 16, 8, bias=True, routed_nowhere=0.1)
    with torch.no_grad():
        check("triton", args, kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("transposed, interleaved", LAYOUTS)
def test_triton_gpt_oss_layouts_on_split_k_and_chunks(transposed, interleaved, dtype, gen, tmp_path, monkeypatch):
    """GPT-OSS's layouts through the tiled launcher: per slot (T=1), split-K from a table with chunked inference,
    and gradients in the weights' own layout with split-K."""
    _, kernels = _triton_kernels()
    k, E, H, inter = 2, 4, 64, 40
    split_k_table(E, H, inter, dtype, tmp_path, monkeypatch)
    monkeypatch.setattr(kernels, "CHUNK_TOKENS", 5)
    f32 = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
    for T in (1, 12):  # 12 tokens: chunks of 5, 5 and 2 under no_grad
        args, kwargs = make_inputs(gen, T, k, E, H, inter, dtype=dtype, bias=True, routed_nowhere=0.1)
        kwargs["activation"] = "swiglu_oai"
        args[1].mul_(12)  # both clamps
        plain = reference.moe_experts(*map(f32, args), **{key: f32(v) for key, v in kwargs.items()})
        model_args, model_kwargs = gpt_oss_layout(args, kwargs, transposed, interleaved)
        with torch.no_grad():
            out = nf.moe_experts(*model_args, backend="triton", **model_kwargs)
        torch.testing.assert_close(out.float(), plain, **tolerance(dtype, plain))
    args, kwargs = make_inputs(gen, 12, k, E, H, inter, bias=True, routed_nowhere=0.1)
    args, kwargs = gpt_oss_layout(args, dict(kwargs, activation="swiglu_oai"), transposed, interleaved)
    upstream = torch.randn(12, H, generator=gen)

    def grads(backend):
        leaves = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        extra = {key: v.clone().requires_grad_() if torch.is_tensor(v) else v for key, v in kwargs.items()}
        (nf.moe_experts(*leaves, backend=backend, **extra) * upstream).sum().backward()
        return [t.grad for t in [*leaves[:4], extra["b_gate_up"], extra["b_down"]]]

    for got, want in zip(grads("triton"), grads("torch"), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_triton_gate_up_interleaved(gen):
    """The launcher reads gate and up interleaved along 2I (GPT-OSS: gate even, up odd), its bias likewise, and
    keeps the saved pre-activation in that column order."""
    _, kernels = _triton_kernels()
    for T in (1, 9):  # per slot, aligned
        args, kwargs = make_inputs(gen, T, 2, 4, 16, 8, bias=True)
        hidden, w_gate_up, w_down, weights, ids = args
        interleave = lambda t: torch.stack([t[:, :8], t[:, 8:]], 2).flatten(1, 2)
        w_mixed, b_mixed = interleave(w_gate_up), interleave(kwargs["b_gate_up"])
        out, _, _, gate_up = kernels.moe_experts_triton(
            hidden, w_mixed, w_down, weights, ids, "swiglu_oai", True, b_mixed, kwargs["b_down"], False, True, True
        )
        expected = reference.moe_experts(*args, activation="swiglu_oai", **kwargs)
        torch.testing.assert_close(out, expected, **tolerance(torch.float32, expected))
        _, _, _, plain = kernels.moe_experts_triton(
            hidden, w_gate_up, w_down, weights, ids, "swiglu_oai", True, kwargs["b_gate_up"], kwargs["b_down"], False,
            True,
        )  # fmt: skip
        torch.testing.assert_close(gate_up, interleave(plain))


@pytest.mark.skipif("cpu" not in FUSED, reason="needs the cpu backend")
def test_torch_compile_fullgraph(gen):
    torch._dynamo.reset()
    args, kwargs = make_inputs(gen, 33, 2, 4, 16, 8, bias=True)

    def layer(hidden, w_gate_up, w_down, weights, ids):
        return nf.moe_experts(hidden, w_gate_up, w_down, weights, ids, backend="cpu", **kwargs) * 2

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(*args), layer(*args))


def test_auto_backend_on_cpu():
    from netmerge_fast._backends import resolve

    expected = "cpu" if nf.backends()["cpu"].available else "torch"
    assert resolve("moe_experts", "auto", torch.device("cpu"), torch.bfloat16) == expected
    assert resolve("moe_experts", "auto", torch.device("cpu"), torch.float64) == expected


def _bad(**changes):
    gen = torch.Generator().manual_seed(0)
    args, _ = make_inputs(gen, 4, 2, 3, 8, 6)
    names = ["hidden", "w_gate_up", "w_down", "topk_weights", "topk_ids"]
    call = dict(zip(names, args, strict=True))
    call.update(changes)
    return call


@pytest.mark.parametrize(
    "call, exc, needle",
    [
        (_bad(hidden=torch.randn(4, 8, 1)), ValueError, "hidden"),
        (_bad(hidden=torch.ones(4, 8, dtype=torch.int64)), TypeError, "hidden"),
        (_bad(hidden=torch.randn(4, 9)), ValueError, "w_down"),
        (_bad(w_gate_up=torch.randn(3, 11, 8)), ValueError, "w_gate_up"),
        (_bad(w_gate_up=torch.randn(2, 12, 8)), ValueError, "w_gate_up"),
        (_bad(w_down=torch.randn(3, 8)), ValueError, "w_down"),
        (_bad(w_down=torch.randn(3, 8, 6, dtype=torch.float64)), TypeError, "w_down"),
        (_bad(topk_ids=torch.tensor([[0, 3]] * 4, dtype=torch.int32)), ValueError, "topk_ids"),
        (_bad(topk_ids=torch.tensor([[0, -2]] * 4, dtype=torch.int32)), ValueError, "topk_ids"),
        (_bad(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids"),
        (_bad(topk_ids=torch.zeros(4, 3, dtype=torch.int32)), ValueError, "same shape"),
        (_bad(topk_weights=torch.rand(4, 2).bfloat16()), TypeError, "topk_weights"),
        (_bad(topk_weights=torch.rand(5, 2), topk_ids=torch.zeros(5, 2, dtype=torch.int32)), ValueError, "T=4"),
        (_bad(activation="tanh"), ValueError, "activation"),
        (_bad(activation="swiglu_oai", gated=False, w_gate_up=torch.randn(3, 6, 8)), ValueError, "swiglu_oai"),
        (_bad(gated=1), TypeError, "gated"),
        (_bad(b_gate_up=torch.randn(3, 6)), ValueError, "b_gate_up"),
        (_bad(b_down=torch.randn(3, 9)), ValueError, "b_down"),
        (_bad(apply_weights_on_input="yes"), TypeError, "apply_weights_on_input"),
        (_bad(transposed=True), ValueError, r"w_down must be \[E, I, H=8\] \(transposed=True\)"),
        (_bad(transposed=1), TypeError, "transposed"),
        (_bad(gate_up_interleaved=True, gated=False, w_gate_up=torch.randn(3, 6, 8)), ValueError, "interleaved"),
        (_bad(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(call, exc, needle):
    with pytest.raises(exc, match=needle):
        nf.moe_experts(**call)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ extension is not built")
def test_cpu_kernel_checks_ids_before_narrowing_them(gen):
    """The kernel's own check (what a caller past the Python checks, or torch.compile, relies on) reads the ids in
    their own type: an int64 id past 2^32 would wrap into range as int32."""
    hidden, w_gate_up, w_down, weights, _ = make_inputs(gen, 2, 2, 3, 16, 8)[0]
    op = torch.ops.netmerge.moe_experts.default
    cases = ((torch.tensor([[0, 2], [1, 2**32]]), 0, 2**32), (torch.tensor([[0, 5], [1, 2]]).byte(), 0, 5))
    for ids, low, high in cases:
        with pytest.raises(ValueError, match=rf"topk_ids must be in \[-1, E=3\) .*got values in \[{low}, {high}\]"):
            op(hidden, w_gate_up, w_down, weights, ids, "silu", True, None, None, False, False)


def test_float64_on_a_fused_only_backend_is_a_clear_error():
    if "triton" not in FUSED:
        pytest.skip("needs the triton backend")
    args, _ = make_inputs(torch.Generator().manual_seed(0), 2, 1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        nf.moe_experts(*args, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 40, 256])
def test_inference_mode(backend, dtype, T, gen):
    # Inference stacks run under torch.inference_mode: the CPU kernel's worker threads must run under it too.
    if backend == "triton" and INTERPRETED and T > 40:
        pytest.skip("interpreter: Triton kept to small cases")
    skip_untrusted_bfloat16(backend, dtype, T, 2, 4)
    args, kwargs = make_inputs(gen, T, 2, 4, 64, 96, dtype=dtype)
    expected = reference.moe_experts(*[a.float() if a.is_floating_point() else a for a in args], **kwargs)
    dev_args, dev_kwargs = _to(device_for(backend), args, kwargs)
    with torch.inference_mode():
        out = nf.moe_experts(*dev_args, **dev_kwargs, backend=backend)
    torch.testing.assert_close(out.cpu().float(), expected, **tolerance(dtype, expected))


@pytest.mark.parametrize("backend", FUSED)
def test_inference_mode_then_training_in_one_thread(backend, gen):
    # The CPU kernel keeps scratch buffers between calls: one made under inference_mode must not be reused outside.
    args, kwargs = make_inputs(gen, 40, 2, 4, 32, 48)
    args, kwargs = _to(device_for(backend), args, kwargs)
    with torch.inference_mode():
        expected = nf.moe_experts(*args, backend=backend, **kwargs)
    hidden = args[0].clone().requires_grad_()
    out = nf.moe_experts(hidden, *args[1:], backend=backend, **kwargs)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected)
    with torch.inference_mode():
        torch.testing.assert_close(nf.moe_experts(*args, backend=backend, **kwargs), expected)


# ---- CUDA (skipped without a GPU): bfloat16 on the tl.dot paths, which the interpreter cannot check ----

# (T, k, E, H, I): decode (slots <= E, one program per slot), small-M tl.dot (few rows per expert), prefill.
CUDA_SHAPES = [(1, 8, 64, 256, 128), (8, 2, 8, 256, 128), (40, 4, 16, 256, 96), (700, 2, 8, 320, 224)]


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "T{}-k{}-E{}-H{}-I{}".format(*s))
def test_cuda_bfloat16_forward(shape, activation, gen):
    for gated in (True, False) if activation != "swiglu_oai" else (True,):
        args, kwargs = make_inputs(gen, *shape, dtype=torch.bfloat16, gated=gated, bias=True, routed_nowhere=0.1)
        if activation == "swiglu_oai":
            args[1].mul_(12)  # reach both clamps
        kwargs.update(activation=activation, gated=gated)
        check("triton", args, kwargs, torch.bfloat16)
        if gated:  # GPT-OSS's own layout: transposed, gate/up interleaved
            check("triton", *gpt_oss_layout(args, kwargs, True, True), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", CUDA_SHAPES[1:], ids=lambda s: "T{}-k{}-E{}-H{}-I{}".format(*s))
def test_cuda_bfloat16_backward(shape, activation, gen):
    options = {"activation": activation, "bias": True, "routed_nowhere": 0.1}
    check_gradients("triton", torch.bfloat16, shape, options, gen)
    if activation != "swiglu_oai":
        check_gradients("triton", torch.bfloat16, shape, dict(options, gated=False, apply_weights_on_input=True), gen)
