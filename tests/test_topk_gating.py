"""topk_gating on every backend against netmerge_fast.reference."""

import math

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from tests.conftest import available_backends, device_for

BACKENDS = available_backends(["torch", "cpu", "triton"])
FUSED = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Each Hugging Face family's routing as one call: (E, k, options).
ROUTINGS = {
    "mixtral": (8, 2, {}),
    "qwen2_moe": (60, 4, {"renormalize": False}),
    "qwen3_moe": (128, 8, {"renormalize": True}),
    "olmoe": (64, 8, {"renormalize": False}),
    "deepseek_v2": (160, 6, {"renormalize": False, "num_groups": 8, "topk_groups": 3, "scale": 16.0}),
    "deepseek_v3": (
        256,
        8,
        {
            "scoring": "sigmoid",
            "bias": True,
            "num_groups": 8,
            "topk_groups": 4,
            "group_score": "top2_sum",
            "scale": 2.5,
        },
    ),
    "gpt_oss": (32, 4, {"softmax_after_topk": True}),
    "sigmoid_plain": (6, 3, {"scoring": "sigmoid", "renormalize": False}),
    "softmax_bias": (60, 5, {"bias": True, "num_groups": 4, "topk_groups": 2}),
    "gpt_oss_bias": (6, 6, {"softmax_after_topk": True, "bias": True}),
    "top2_no_bias": (64, 4, {"num_groups": 8, "topk_groups": 2, "group_score": "top2_sum"}),
    # The chosen groups hold fewer than k experts: the others fill the remaining slots (transformers' DeepSeek-V3
    # test model: 8 experts, 2 groups, top-1 group, k = 8).
    "deepseek_v3_tester": (
        8,
        8,
        {
            "scoring": "sigmoid",
            "bias": True,
            "num_groups": 2,
            "topk_groups": 1,
            "group_score": "top2_sum",
            "scale": 2.5,
        },
    ),
    "groups_short": (16, 6, {"num_groups": 4, "topk_groups": 1}),
    "groups_short_top2": (
        24,
        7,
        {"scoring": "sigmoid", "bias": True, "num_groups": 6, "topk_groups": 1, "group_score": "top2_sum"},
    ),
}


def _options(name, E, gen, device):
    options = dict(ROUTINGS[name][2])
    if options.pop("bias", False):
        options["bias"] = (torch.randn(E, generator=gen) * 0.5).to(device)
    return options


def _key_is_logit(options):
    top2 = options.get("group_score") == "top2_sum" and options.get("num_groups", 1) > 1
    return options.get("bias") is None and (options.get("softmax_after_topk", False) or not top2)


def _reference_keys(x, options):
    """Selection keys and (for group routing) the allowed-group mask, as the reference defines them."""
    x = x.float().masked_fill(torch.isnan(x), -math.inf)
    if _key_is_logit(options):
        return x, None
    if options.get("softmax_after_topk"):
        scores = x
    elif options.get("scoring", "softmax") == "softmax":
        scores = reference.softmax_with_limits(x)
    else:
        scores = torch.sigmoid(x)
    bias = options.get("bias")
    key = scores if bias is None else scores + bias.float()
    return key.masked_fill(torch.isnan(key), -math.inf), scores


def _near_tie(sorted_desc, upto, rtol=2e-6):
    v = sorted_desc[:, :upto].double()
    gap = v[:, :-1] - v[:, 1:]
    finite = torch.isfinite(v[:, :-1]) & torch.isfinite(v[:, 1:])
    return (finite & (gap > 0) & (gap <= rtol * v[:, :-1].abs().clamp_min(1.0))).any(1)


def _ambiguous_rows(x, k, options):
    """Rows whose answer hangs on a rounding-level difference between computed keys (never on exact ties)."""
    T, E = x.shape
    if _key_is_logit(options):
        return torch.zeros(T, dtype=torch.bool)
    key, _ = _reference_keys(x.cpu(), {k_: (v.cpu() if torch.is_tensor(v) else v) for k_, v in options.items()})
    G = options.get("num_groups", 1)
    amb = torch.zeros(T, dtype=torch.bool)
    allowed = torch.ones_like(key, dtype=torch.bool)
    if G > 1:
        grouped = key.view(T, G, E // G)
        if options.get("group_score") == "top2_sum":
            gkey = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            gkey = grouped.amax(-1)
        gkey = gkey.masked_fill(torch.isnan(gkey), -math.inf)
        tg = options.get("topk_groups") or G
        gsorted = gkey.sort(-1, descending=True).values
        amb |= _near_tie(gsorted, min(tg + 1, G))
        best = torch.sort(gkey, dim=-1, descending=True, stable=True).indices[:, :tg]
        allowed = torch.zeros(T, G, dtype=torch.bool).scatter(1, best, True).repeat_interleave(E // G, 1)
    ksorted = key.masked_fill(~allowed, -math.inf).sort(-1, descending=True).values
    amb |= _near_tie(ksorted, min(k + 1, E))
    return amb


def _weights_for_ids(x, ids, options):
    """The weights the documented rules give for a given choice of experts."""
    x = x.float().masked_fill(torch.isnan(x), -math.inf)
    ids = ids.long()
    if options.get("softmax_after_topk"):
        w = reference.softmax_with_limits(x.gather(1, ids))
    else:
        if options.get("scoring", "softmax") == "softmax":
            w = reference.softmax_with_limits(x).gather(1, ids)
        else:
            w = torch.sigmoid(x.gather(1, ids))
        if options.get("renormalize", True):
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * options.get("scale", 1.0)


def _softmax_with_limits(values):
    m = max(values)
    if m == math.inf:
        return [float(v == math.inf) / values.count(math.inf) for v in values]
    if m == -math.inf:
        return [0.0] * len(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def _loop_routing(x, k, scoring="softmax", renormalize=True, bias=None, num_groups=1, topk_groups=None,
                  group_score="max", softmax_after_topk=False, scale=1.0):  # fmt: skip
    """An oracle independent of reference.py: row by row in float64 Python (scores rounded to float32, as the op
    holds them), experts ranked by sorting (key, index) pairs."""
    E = x.shape[1]
    size = E // num_groups
    top2 = group_score == "top2_sum" and num_groups > 1
    no_nan = lambda v: -math.inf if math.isnan(v) else v
    all_w, all_ids = [], []
    for row in x.double().tolist():
        logits = [no_nan(v) for v in row]
        if softmax_after_topk:
            scores = logits
        elif scoring == "softmax":
            scores = _softmax_with_limits(logits)
        else:
            scores = [1 / (1 + math.exp(-v)) if v > -700 else 0.0 for v in logits]
        # Scores held in float32, as the op documents: equal after rounding means a tie (lower index first).
        scores = torch.tensor(scores, dtype=torch.float64).float().tolist()
        if bias is None and (softmax_after_topk or not top2):
            key = logits
        else:
            key = [no_nan(s + (0.0 if bias is None else float(bias[e]))) for e, s in enumerate(scores)]
        group_key = []
        for g in range(num_groups):
            ranked = sorted(key[g * size : (g + 1) * size], reverse=True)
            group_key.append(no_nan(ranked[0] + ranked[1]) if top2 else ranked[0])
        groups = sorted(range(num_groups), key=lambda g: (-group_key[g], g))[: topk_groups or num_groups]
        # The chosen groups' experts by key, then (when those hold fewer than k) the others in index order.
        chosen = sorted(range(E), key=lambda e: (e // size not in groups, -key[e] if e // size in groups else 0, e))
        chosen = chosen[:k]
        if softmax_after_topk:
            w = _softmax_with_limits([logits[e] for e in chosen])
        else:
            w = [scores[e] for e in chosen]
            if renormalize:
                w = [v / (sum(w) + 1e-20) for v in w]
        all_w.append([v * scale for v in w])
        all_ids.append(chosen)
    return torch.tensor(all_w, dtype=torch.float32).view(-1, k), torch.tensor(all_ids, dtype=torch.int32).view(-1, k)


def check_routing(x, k, options, backend, max_ambiguous=0.1):
    """Ours against reference.py; the torch backend (reference.py itself) against the loop oracle."""
    weights, ids = nf.topk_gating(x, k, backend=backend, **options)
    oracle = _loop_routing if backend == "torch" else reference.topk_gating
    ref_w, ref_ids = oracle(x.cpu(), k, **{n: (v.cpu() if torch.is_tensor(v) else v) for n, v in options.items()})
    T, E = x.shape
    assert weights.shape == (T, k) and ids.shape == (T, k)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    weights, ids = weights.cpu(), ids.cpu()
    assert not torch.isnan(weights).any()
    assert ((ids >= 0) & (ids < E)).all()
    if T:
        assert (ids.sort(-1).values.diff(dim=-1) != 0).all(), "ids within a row must be distinct"
    amb = _ambiguous_rows(x, k, options)
    assert T == 0 or amb.float().mean() <= max_ambiguous, "too many near-ties: the test would say little"
    sure = ~amb
    torch.testing.assert_close(ids[sure], ref_ids[sure], rtol=0, atol=0)
    torch.testing.assert_close(weights[sure], ref_w[sure], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(weights[amb], _weights_for_ids(x.cpu()[amb], ids[amb], options), rtol=2e-5, atol=1e-6)
    return weights, ids


# T=3 and T=333 reach both CPU layouts: rows on their own (decode) and blocks of rows across vector lanes.
@pytest.mark.parametrize("T", [3, 333])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_routings_match_reference(name, dtype, backend, T, gen):
    E, k, _ = ROUTINGS[name]
    device = device_for(backend)
    T = min(T, 19) if backend == "triton" else T
    x = (torch.randn(T, E, generator=gen) * 2).to(dtype).to(device)
    check_routing(x, k, _options(name, E, gen, device), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,k", [(1, 1), (6, 1), (6, 6), (60, 7), (160, 160), (7, 3), (1024, 4)])
@pytest.mark.parametrize("T", [0, 1, 2, 37])
def test_shapes(T, E, k, backend, gen):
    if backend == "triton" and E * max(T, 1) > 2048:
        pytest.skip("interpreter: keep the Triton cases small")
    x = torch.randn(T, E, generator=gen).to(device_for(backend))
    for options in ({}, {"scoring": "sigmoid", "renormalize": False}, {"softmax_after_topk": True}):
        check_routing(x, k, options, backend)


def _adversarial(gen, T, E, dtype):
    """Ties, infinities, NaN, huge magnitudes and constant rows, mixed with ordinary rows."""
    x = torch.randint(-3, 3, (T, E), generator=gen).float()  # many exact ties
    big = torch.finfo(dtype).max
    x[0] = 0.0
    x[1] = -math.inf
    x[2] = math.nan
    x[3, ::2] = math.nan
    x[4, 1] = math.inf
    x[5, 1::3] = math.inf
    x[6, :] = -math.inf
    x[6, E - 1] = 1.0
    x[7] = torch.where(torch.rand(E, generator=gen) < 0.5, big, -big)
    x[8, 0] = math.nan  # NaN at the lowest index must lose to finite values
    x[9, : E // 2] = -math.inf
    x[10] = torch.randn(E, generator=gen) * 1e4
    x[11, ::2] = -0.0
    x[11, 1::2] = 0.0
    x[12, 2] = math.inf
    x[12, 3] = -math.inf
    x[12, 4] = math.nan
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "name",
    [
        "mixtral",
        "qwen2_moe",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "sigmoid_plain",
        "softmax_bias",
        "gpt_oss_bias",
        "top2_no_bias",
        "deepseek_v3_tester",
        "groups_short",
    ],
)
def test_adversarial_inputs(name, dtype, backend, gen):
    E, k, _ = ROUTINGS[name]
    device = device_for(backend)
    options = _options(name, E, gen, device)
    if "bias" in options:  # a coarse grid keeps ties exact through score + bias
        options["bias"] = torch.randint(-2, 3, (E,), generator=gen).float().to(device) / 4
    x = _adversarial(gen, 16, E, dtype).to(device)
    for rows in (x, x[:5], x[5:10], x[10:]):  # one block of rows, and rows routed on their own
        weights, _ = check_routing(rows, k, options, backend, max_ambiguous=0.25)
        assert torch.isfinite(weights).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_non_finite_rows(backend):
    device = device_for(backend)
    E, k = 8, 3
    x = torch.full((4, E), -math.inf)
    x[1] = math.nan
    x[2, 5] = 1.0  # one finite logit among NaN/-inf: it gets all the mass
    x[2, :5] = math.nan
    x[3, 2] = x[3, 6] = math.inf  # +inf logits share the mass
    w, ids = nf.topk_gating(x.to(device), k, backend=backend)
    w, ids = w.cpu(), ids.cpu()
    assert ids[0].tolist() == [0, 1, 2] and w[0].tolist() == [0.0, 0.0, 0.0]
    assert ids[1].tolist() == [0, 1, 2] and w[1].tolist() == [0.0, 0.0, 0.0]
    assert ids[2, 0] == 5 and w[2].tolist() == [1.0, 0.0, 0.0]
    assert ids[3, :2].tolist() == [2, 6] and w[3].tolist() == [0.5, 0.5, 0.0]
    # Sigmoid maps -inf to 0 and +inf to 1; renormalising a zero mass gives zeros, not NaN.
    w, _ = nf.topk_gating(x.to(device), k, scoring="sigmoid", backend=backend)
    assert w.cpu()[0].tolist() == [0.0, 0.0, 0.0]
    assert w.cpu()[3].tolist() == pytest.approx([0.5, 0.5, 0.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    device = device_for(backend)
    x = torch.tensor([[1.0, 3.0, 3.0, 1.0, 3.0, 0.0], [2.0] * 6]).to(device)
    _, ids = nf.topk_gating(x, 4, backend=backend)
    assert ids.cpu().tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]
    # Groups tie too: groups {0,1} {2,3} {4,5} score 3, 3, 3 with the max rule -> the first two win.
    _, ids = nf.topk_gating(x, 4, num_groups=3, topk_groups=2, backend=backend)
    assert ids.cpu().tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_holding_fewer_than_k_experts_fill_in_index_order(backend):
    """An explicit example of the documented rule, independent of the reference."""
    device = device_for(backend)
    x = torch.tensor([[0.1, 0.2, 3.0, 2.5, 0.3, 0.4, 0.0, 0.5], [0.0] * 8])
    # Groups {0,1} {2,3} {4,5} {6,7}: the best (by max) is {2,3}; then experts 0, 1, 4, ... in index order.
    w, ids = nf.topk_gating(x.to(device), 5, num_groups=4, topk_groups=1, scale=2.0, backend=backend)
    assert ids.cpu().tolist() == [[2, 3, 0, 1, 4], [0, 1, 2, 3, 4]]
    probs = torch.softmax(x, -1).gather(1, ids.cpu().long())
    torch.testing.assert_close(w.cpu(), 2.0 * probs / probs.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    # Sigmoid with a selection bias: the weights of the filling experts are their unbiased scores.
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = nf.topk_gating(
        x.to(device), 8, scoring="sigmoid", bias=bias.to(device), num_groups=2, topk_groups=1,
        group_score="top2_sum", renormalize=False, backend=backend,
    )  # fmt: skip
    # Row 0: group {0..3} scores 5.1 + 3.0 (bias included), {4..7} 0.5 + 0.4.
    assert ids.cpu().tolist() == [[0, 2, 3, 1, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    torch.testing.assert_close(w.cpu(), torch.sigmoid(x).gather(1, ids.cpu().long()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, gen):
    device = device_for(backend)
    base = torch.randn(64, 40, generator=gen).to(device)
    for x in (base[:, ::2], base.t()[:, :31], base[::3]):
        for options in ({}, {"scoring": "sigmoid", "num_groups": 4, "topk_groups": 2, "group_score": "top2_sum"}):
            E = x.shape[1]
            if options.get("num_groups", 1) > 1 and E % 4:
                continue
            check_routing(x, 3, options, backend)


def test_gradcheck_reference_fp64(gen):
    for name in ROUTINGS:
        E, k, _ = ROUTINGS[name]
        options = _options(name, E, gen, "cpu")
        x = torch.randn(3, E, generator=gen, dtype=torch.float64, requires_grad=True)
        torch.autograd.gradcheck(lambda t, k=k, o=options: nf.topk_gating(t, k, backend="torch", **o)[0], (x,))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_gradients_match_reference(name, dtype, backend, gen):
    E, k, _ = ROUTINGS[name]
    device = device_for(backend)
    options = _options(name, E, gen, device)
    x = (torch.randn(12, E, generator=gen) * 2).to(dtype)
    if name in ("mixtral", "gpt_oss", "sigmoid_plain"):
        x[0, 1] = math.inf  # rows with infinite maxima get zero gradient on every path
        x[1, :] = -math.inf
        x[2, 0] = math.nan
    upstream = torch.randn(12, k, generator=gen)
    x_ref = x.clone().requires_grad_()
    w_ref, ids_ref = reference.topk_gating(
        x_ref, k, **{n: (v.cpu() if torch.is_tensor(v) else v) for n, v in options.items()}
    )
    (w_ref * upstream).sum().backward()
    x_ours = x.to(device).requires_grad_()
    w, ids = nf.topk_gating(x_ours, k, backend=backend, **options)
    sure = ~_ambiguous_rows(x, k, options)
    assert torch.equal(ids.cpu()[sure], ids_ref[sure])
    (w * upstream.to(device)).sum().backward()
    assert x_ours.grad.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    torch.testing.assert_close(x_ours.grad.cpu()[sure], x_ref.grad[sure], **tol)


def test_double_backward_matches_reference(gen):
    if "cpu" not in FUSED:
        pytest.skip("needs the cpu backend")
    x = torch.randn(5, 8, generator=gen, dtype=torch.float32)
    grads = []
    for backend in ("torch", "cpu"):
        xi = x.clone().requires_grad_()
        w, _ = nf.topk_gating(xi, 3, renormalize=False, backend=backend)
        (g,) = torch.autograd.grad(w.square().sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad(g.sum(), xi)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in BACKENDS])
def test_torch_compile_fullgraph(backend, gen):
    torch._dynamo.reset()

    def route(logits, bias):
        w, ids = nf.topk_gating(
            logits,
            4,
            scoring="sigmoid",
            bias=bias,
            num_groups=4,
            topk_groups=2,
            group_score="top2_sum",
            scale=2.0,
            backend=backend,
        )
        return (w * ids.float()).sum(-1), w, ids

    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    x = torch.randn(33, 16, generator=gen)
    bias = torch.randn(16, generator=gen) * 0.1
    eager = route(x, bias)
    got = compiled(x, bias)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    route(x1, bias)[0].sum().backward()
    compiled(x2, bias)[0].sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED)
def test_repeatable(backend, gen):
    """Repeated calls agree bit for bit, and with the reference (so they are not merely equally wrong)."""
    x = torch.randn(200, 64, generator=gen).to(device_for(backend))
    a = check_routing(x, 6, {"num_groups": 8, "topk_groups": 3}, backend)
    b = nf.topk_gating(x, 6, backend=backend, num_groups=8, topk_groups=3)
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


def test_auto_backend_on_cpu_picks_the_native_kernel():
    x = torch.randn(4, 8)
    expected = "cpu" if nf.backends()["cpu"].available else "torch"
    from netmerge_fast._backends import resolve

    assert resolve("topk_gating", "auto", x.device, x.dtype) == expected
    assert resolve("topk_gating", "auto", x.device, torch.float64) == "torch"


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"router_logits": torch.randn(8)}, ValueError, "router_logits"),
        ({"router_logits": torch.randn(2, 3, 8)}, ValueError, "router_logits"),
        ({"router_logits": torch.ones(4, 8, dtype=torch.int64)}, TypeError, "router_logits"),
        ({"router_logits": [[1.0, 2.0]]}, TypeError, "router_logits"),
        ({"router_logits": torch.randn(4, 0), "k": 1}, ValueError, "router_logits"),
        ({"k": 0}, ValueError, "k"),
        ({"k": 9}, ValueError, "k"),
        ({"k": 2.0}, TypeError, "k"),
        ({"k": True}, TypeError, "k"),
        ({"scoring": "relu"}, ValueError, "scoring"),
        ({"renormalize": 1}, TypeError, "renormalize"),
        ({"num_groups": 3}, ValueError, "num_groups"),
        ({"num_groups": 0}, ValueError, "num_groups"),
        ({"num_groups": 4, "topk_groups": 5}, ValueError, "topk_groups"),
        ({"num_groups": 4, "topk_groups": 0}, ValueError, "topk_groups"),
        ({"num_groups": 8, "group_score": "top2_sum"}, ValueError, "top2_sum"),
        ({"group_score": "mean"}, ValueError, "group_score"),
        ({"softmax_after_topk": True, "scoring": "sigmoid"}, ValueError, "softmax_after_topk"),
        ({"bias": torch.randn(7)}, ValueError, "bias"),
        ({"bias": torch.randn(8, 1)}, ValueError, "bias"),
        ({"bias": torch.ones(8, dtype=torch.int32)}, TypeError, "bias"),
        ({"scale": math.nan}, ValueError, "scale"),
        ({"scale": "2"}, TypeError, "scale"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"router_logits": torch.randn(4, 8, dtype=torch.float64), "backend": "cpu"}, TypeError, "float64"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, needle):
    args = {"router_logits": torch.randn(4, 8), "k": 2}
    args.update(kwargs)
    if args.get("backend") == "cpu" and not nf.backends()["cpu"].available:
        pytest.skip("needs the cpu backend")
    with pytest.raises(exc, match=needle):
        nf.topk_gating(args.pop("router_logits"), args.pop("k"), **args)


def test_missing_backend_is_a_clear_error(monkeypatch):
    from netmerge_fast import _backends

    monkeypatch.setattr(_backends, "_resolved", {})
    monkeypatch.setattr(
        _backends,
        "backends",
        lambda: {
            "cpu": _backends.BackendStatus(False, "not built"),
            "triton": _backends.BackendStatus(False, "none"),
            "cuda": _backends.BackendStatus(False, "none"),
            "torch": _backends.BackendStatus(True, "ref"),
        },
    )
    with pytest.raises(RuntimeError, match="not built"):
        nf.topk_gating(torch.randn(2, 4), 1, backend="cpu")
    assert nf.topk_gating(torch.randn(2, 4), 1)[1].shape == (2, 1)  # auto falls back to torch
