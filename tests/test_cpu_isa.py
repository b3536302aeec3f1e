"""The CPU kernels' run-time instruction-set choice: every build this machine can run gives the reference's
answers (the baseline build is what a CPU without AVX2 runs), the override works, and the link keeps every
instruction set's code where only that instruction set runs it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import _backends, reference

pytestmark = pytest.mark.skipif(not _backends.native_status().available, reason="the C++ extension is not built")


@pytest.fixture(params=_backends.cpu_isas() or ["baseline"])
def isa(request):
    previous = _backends.cpu_isa()
    _backends.set_cpu_isa(request.param)
    yield request.param
    _backends.set_cpu_isa(previous)


def test_every_build_routes_like_the_reference(isa, gen):
    logits = torch.randn(37, 64, generator=gen)
    logits[3, 5] = float("nan")
    logits[4, :8] = logits[4, 8]  # ties
    bias = torch.randn(64, generator=gen) * 0.1
    for options in (
        {},
        {"scoring": "sigmoid", "bias": bias, "num_groups": 8, "topk_groups": 4, "group_score": "top2_sum"},
        {"softmax_after_topk": True},
    ):
        for T in (1, 5, 37):  # the per-row and the blocked paths
            w, i = nf.topk_gating(logits[:T], 6, backend="cpu", **options)
            rw, ri = reference.topk_gating(logits[:T], 6, **options)
            assert torch.equal(i.long(), ri.long())
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_build_selects_like_the_reference_at_every_width(isa, gen, dtype):
    # Expert counts on both sides of the blocked path's limit (4 vectors: 32 experts on AVX2, 64 on AVX-512),
    # k from 1 to E, groups holding fewer than k experts, and rows of ties, -inf, NaN and huge magnitudes.
    cases = (
        (8, 2, {}),
        (20, 3, {"renormalize": False}),
        (40, 6, {}),
        (64, 8, {"scoring": "sigmoid"}),
        (128, 8, {}),
        (128, 8, {"renormalize": False}),
        (160, 5, {"num_groups": 8, "topk_groups": 3}),
        (64, 20, {"num_groups": 8, "topk_groups": 2}),
        (33, 33, {}),
        (96, 1, {"softmax_after_topk": True}),
        (256, 8, {"scoring": "sigmoid", "num_groups": 8, "topk_groups": 4, "group_score": "top2_sum", "scale": 2.5}),
    )
    for E, k, options in cases:
        if options.get("group_score") == "top2_sum":
            options = dict(options, bias=torch.randn(E, generator=gen) * 0.1)
        logits = torch.randn(50, E, generator=gen) * 3
        logits[1] = 0.5  # all tied
        logits[2] = float("-inf")
        logits[3, ::3] = float("nan")
        logits[4, : E // 2] = 1e30
        logits[5, E // 3] = float("inf")
        logits = logits.to(dtype)
        for T in (1, 3, 50):  # the per-row path, and blocks with a remainder
            w, i = nf.topk_gating(logits[:T], k, backend="cpu", **options)
            rw, ri = reference.topk_gating(logits[:T], k, **options)
            assert torch.equal(i.long(), ri.long()), (E, k, options, T)
            torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def test_every_build_computes_experts_and_their_gradients(isa, gen):
    T, k, E, H, inter = 40, 2, 6, 24, 20
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    w_gate_up = (torch.randn(E, 2 * inter, H, generator=gen, dtype=torch.float64) * H**-0.5).requires_grad_()
    w_down = (torch.randn(E, H, inter, generator=gen, dtype=torch.float64) * inter**-0.5).requires_grad_()
    weights = torch.rand(T, k, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).int()
    out = nf.moe_experts(hidden, w_gate_up, w_down, weights, ids, backend="cpu")
    expected = reference.moe_experts(hidden, w_gate_up, w_down, weights, ids)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (hidden, w_gate_up, w_down))
    expected_grads = torch.autograd.grad(expected.square().sum(), (hidden, w_gate_up, w_down))
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.detach().to(dtype) for t in (hidden, w_gate_up, w_down)]
        out = nf.moe_experts(*args, weights.float(), ids, backend="cpu")
        ref = reference.moe_experts(*(a.float() for a in args), weights.float(), ids)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_every_build_combines_logits(isa, gen):
    logits = torch.randn(33, 3 * 10, generator=gen)
    for method in ("std", "third_quartile", "energy"):
        out, winner = nf.combine_logits(logits, [10, 10, 10], method=method, return_winner=True, backend="cpu")
        ref, ref_winner = reference.combine_logits(logits, [10, 10, 10], method=method)
        torch.testing.assert_close(out, ref)
        assert torch.equal(winner, ref_winner)
    stats = nf.logit_statistics(logits, [10, 10, 10], stats=("mean", "std", "max", "q3"), backend="cpu")
    torch.testing.assert_close(
        stats, reference.logit_statistics(logits, [10, 10, 10], stats=("mean", "std", "max", "q3"))
    )


def test_fma_peak_is_positive_on_every_build(isa):
    from netmerge_fast import _C

    assert _C.fma_peak(0.01) > 0


def test_isa_names_and_errors():
    isas = _backends.cpu_isas()
    assert isas[0] == "baseline" and _backends.cpu_isa() in isas
    assert f"CPU kernels: {_backends.cpu_isa()}" in nf.backends()["cpu"].reason
    with pytest.raises(ValueError, match="name must be 'auto' or one of"):
        _backends.set_cpu_isa("sse9")
    if "avx512" not in isas:
        with pytest.raises(ValueError, match="one of"):
            _backends.set_cpu_isa("avx512")


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_caps_the_instruction_set():
    code = "from netmerge_fast import _backends; print(_backends.cpu_isa())"
    assert _run(code, NETMERGE_CPU_ISA="baseline").stdout.strip() == "baseline"
    bad = _run("import torch, netmerge_fast as nf; nf.topk_gating(torch.randn(2, 4), 1)", NETMERGE_CPU_ISA="sse9")
    assert bad.returncode != 0 and "NETMERGE_CPU_ISA must be" in bad.stderr


def _objects_of(build: Path, level: str) -> list[Path]:
    return sorted(build.glob(f"CMakeFiles/netmerge_cpu_{level}.dir/**/*.o"))


@pytest.mark.slow
def test_link_keeps_each_inline_function_from_the_lowest_instruction_set():
    """An inline function (a std:: or c10 template) compiled into several levels' objects is linked once: the copy
    kept must be the baseline one whenever the baseline objects have it, or a baseline caller would run AVX code.
    Finds every function of _C that uses VEX/EVEX instructions outside the instruction-set namespaces and checks
    that no baseline object defines it."""
    tools = [shutil.which(t) for t in ("objdump", "nm")]
    build = Path(__file__).resolve().parents[1] / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}"
    baseline_objects = _objects_of(build, "baseline") + sorted(build.glob("CMakeFiles/_C.dir/**/*.o"))
    if not all(tools) or not baseline_objects:
        pytest.skip("needs objdump, nm and the CMake build folder of an editable install")
    from netmerge_fast import _C

    isa_names = re.compile(
        r"netmerge::cpu::(avx2|avx512|avx512_bf16)::|at::vec::(AVX2|AVX512)::"
        r"|(?<![0-9])(4avx2|6avx512|11avx512_bf16|4AVX2|6AVX512)(?![a-z])"
    )
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", _C.__file__], capture_output=True, text=True)
    vector_code, current = set(), None
    for line in listing.stdout.splitlines():
        if line.endswith(">:"):
            current = line[line.index("<") + 1 : -2]
            continue
        fields = line.split("\t")
        if current and len(fields) > 1 and not isa_names.search(current):
            insn = fields[1].strip()
            if insn.startswith("v") or "%ymm" in insn or "%zmm" in insn:
                vector_code.add(current)
    defined = subprocess.run(["nm", "--defined-only", *map(str, baseline_objects)], capture_output=True, text=True)
    baseline_symbols = {line.split()[-1] for line in defined.stdout.splitlines() if len(line.split()) == 3}
    assert not sorted(vector_code & baseline_symbols)
