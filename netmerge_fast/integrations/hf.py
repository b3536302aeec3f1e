"""Drop-in for Hugging Face transformers 5 MoE models: their routers compute top-k with ``topk_gating`` and their
experts modules run on ``moe_experts``, with the models' answers unchanged.

    from netmerge_fast.integrations import hf

    report = hf.enable(model)        # model: e.g. Qwen3MoeForCausalLM; report says what changed
    model.generate(...)              # or train: backward runs through both parts
    hf.disable(model)                # back to exactly what it was

Experts go through transformers' own extension point: an implementation named ``"netmerge"`` is registered in
``transformers.integrations.moe.ExpertsInterface`` and selected with ``model.set_experts_implementation``. Each
experts module is inspected once at ``enable`` (``has_gate``, ``has_bias``, ``is_transposed``, its activation and
``_apply_gate``); modules it cannot run exactly keep the implementation the model had. Routers keep their class,
their outputs and their hooks (so ``output_router_logits=True`` and the load-balancing loss work as before); only
the instance's ``forward`` is replaced.

``enable`` touches no parameter: every family's experts are read in their own layout (GPT-OSS's transposed,
interleaved weights through ``moe_experts(..., transposed=True, gate_up_interleaved=True)``), so parameters,
optimizer state and checkpoints stay the model's own, and ``disable`` only undoes forwards. A router or experts
module is patched only where netmerge-fast computes exactly what transformers does, on a fused backend (``cpu``,
``triton``) for the module's device and dtype; the others stay on transformers' code, with the reason in
``report.skipped``.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from netmerge_fast import _checks, packed_experts, reference
from netmerge_fast._backends import resolve
from netmerge_fast.dispatch import moe_experts, run_validated
from netmerge_fast.integrations import switch_transformers
from netmerge_fast.packed_experts import packable
from netmerge_fast.routing import topk_gating

__all__ = ["EXPERTS_IMPLEMENTATION", "HFPatchReport", "disable", "enable"]

EXPERTS_IMPLEMENTATION = "netmerge"


@dataclass
class HFPatchReport:
    """What ``enable`` changed: module names (as in ``model.named_modules()``) and why others were left alone."""

    routers: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    previous_experts_implementation: dict | None = None

    @property
    def changed(self) -> bool:
        return bool(self.routers or self.experts)


# --- routing ------------------------------------------------------------------------------------------------------


def _softmax_routing(module: nn.Module) -> dict:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax over all experts, top-k, renormalised if norm_topk_prob
    (Mixtral has none: it always renormalises; read __dict__ to skip nn.Module's slow attribute miss)."""
    return {"k": module.top_k, "renormalize": bool(module.__dict__.get("norm_topk_prob", True))}


def _softmax_router(cast_weights: bool):
    """Mixtral returns float32 weights; the others cast the weights to the logits' dtype."""

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        weights, ids = topk_gating(logits, **_softmax_routing(self))
        if cast_weights:
            weights = weights.to(logits.dtype)
        return logits, weights, ids.long()

    return forward


def _deepseek_v3_routing(module: nn.Module) -> dict:
    """Sigmoid scores, e_score_correction_bias for selection, top-2-sum group limiting (groups that hold fewer than
    k experts: the others fill in, as transformers' top-k over the -inf-masked scores takes them),
    routed_scaling_factor."""
    return {
        "k": module.top_k,
        "scoring": "sigmoid",
        "renormalize": bool(module.norm_topk_prob),
        "bias": module.e_score_correction_bias,
        "num_groups": module.num_group,
        "topk_groups": module.topk_group,
        "group_score": "top2_sum",
        "scale": float(module.routed_scaling_factor),
    }


def _deepseek_v3_router(self, hidden_states):
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
    weights, ids = topk_gating(logits, **_deepseek_v3_routing(self))
    return logits, weights, ids.long()


def _gpt_oss_routing(module: nn.Module) -> dict:
    """Top-k on the biased logits, softmax over the k chosen."""
    return {"k": module.top_k, "softmax_after_topk": True}


def _gpt_oss_router(self, hidden_states):
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
    weights, ids = topk_gating(logits, **_gpt_oss_routing(self))
    return logits, weights.to(logits.dtype), ids.long()  # the weights in the logits' dtype, as GPT-OSS


# (module of the modeling file, router class) -> (forward that replaces the instance's, its topk_gating arguments,
# the dtype of its logits: None for the router weight's).
_ROUTERS = {
    ("mixtral", "MixtralTopKRouter"): (_softmax_router(cast_weights=False), _softmax_routing, None),
    ("qwen2_moe", "Qwen2MoeTopKRouter"): (_softmax_router(cast_weights=True), _softmax_routing, None),
    ("qwen3_moe", "Qwen3MoeTopKRouter"): (_softmax_router(cast_weights=True), _softmax_routing, None),
    ("olmoe", "OlmoeTopKRouter"): (_softmax_router(cast_weights=True), _softmax_routing, None),
    ("deepseek_v3", "DeepseekV3TopkRouter"): (_deepseek_v3_router, _deepseek_v3_routing, torch.float32),
    ("gpt_oss", "GptOssTopKRouter"): (_gpt_oss_router, _gpt_oss_routing, None),
}


def _router_key(module: nn.Module) -> tuple[str, str] | None:
    cls = type(module)
    parts = cls.__module__.split(".")
    if len(parts) < 2 or parts[0] != "transformers" or not parts[-1].startswith("modeling_"):
        return None
    return parts[-1].removeprefix("modeling_"), cls.__name__


def _looks_like_router(module: nn.Module) -> bool:
    name = type(module).__name__
    return type(module).__module__.startswith("transformers.") and ("Router" in name or name.endswith("Gate"))


# --- experts ------------------------------------------------------------------------------------------------------


@dataclass
class _ExpertsPlan:
    activation: str
    interleaved: bool  # GPT-OSS: gate/up columns interleaved (gate = even, up = odd)
    quantize: str | None = None  # enable(quantize_experts=...)
    packed: packed_experts.PackCache = field(default_factory=packed_experts.PackCache)


def _activation_of(module: nn.Module) -> str | None:
    """Our activation name for the module's act_fn, or None when it is not one we compute identically."""
    from transformers import activations as acts

    act = getattr(module, "act_fn", None)
    if isinstance(act, acts.SiLUActivation | nn.SiLU):
        return "silu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, acts.GELUActivation):
        return "gelu"
    if isinstance(act, acts.GELUTanh | acts.NewGELUActivation):
        return "gelu_tanh"
    return None


def _plan_experts(module: nn.Module) -> _ExpertsPlan | str:
    """How to run this experts module on moe_experts, or why it cannot be."""
    from transformers.integrations.moe import _default_apply_gate

    if getattr(module, "has_post_expert_norm", False):
        return "post-expert norm is not supported"
    gated = bool(module.has_gate)
    custom_gate = gated and type(module)._apply_gate is not _default_apply_gate
    if custom_gate:
        if _router_key(module) != ("gpt_oss", "GptOssExperts"):
            return f"custom _apply_gate of {type(module).__name__} is not known"
        if (module.alpha, module.limit) != (reference.SWIGLU_OAI_ALPHA, reference.SWIGLU_OAI_LIMIT):
            return f"GPT-OSS swiglu with alpha={module.alpha}, limit={module.limit} (supported: 1.702, 7.0)"
        return _ExpertsPlan("swiglu_oai", interleaved=True)
    activation = _activation_of(module)
    if activation is None:
        return f"activation {type(getattr(module, 'act_fn', None)).__name__} is not supported"
    if not bool(getattr(module, "is_concatenated", True)) and gated:
        return "interleaved gate/up with the default _apply_gate is not a layout transformers computes"
    return _ExpertsPlan(activation, interleaved=False)


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``"netmerge"`` experts implementation: one ``moe_experts`` call on the module's own parameters."""
    plan = self.__dict__.get("_netmerge_plan")
    if not isinstance(plan, _ExpertsPlan) or self._is_expert_parallel:
        return _fallback(self, plan)(self, hidden_states, top_k_index, top_k_weights)
    first, down, b_first, b_down = _expert_tensors(self)
    x = hidden_states.to(first.dtype)
    layout = (self.is_transposed, plan.interleaved)
    if (
        plan.quantize is not None
        or packed_experts.is_released(self)
        or packed_experts.runs_packed(x, first, "auto", x, top_k_weights, first, down, b_first, b_down)
    ):
        # CPU inference, or int8: the weights packed once into the micro-kernel's layout (gate and up concatenated).
        packed = plan.packed.get(
            first, down, quantize=plan.quantize, transposed=layout[0], gate_up_interleaved=layout[1]
        )
        if plan.interleaved and b_first is not None:
            b_first = torch.cat([b_first[..., 0::2], b_first[..., 1::2]], dim=-1)
        first, down, layout = packed, None, (False, False)
    # The weights were checked at enable and the ids come from a router's top-k: skip moe_experts' per-call checks.
    out = run_validated(
        x, first, down, top_k_weights.float(), top_k_index, plan.activation, self.has_gate, b_first, b_down, False,
        "auto", *layout,
    )  # fmt: skip
    return out.to(hidden_states.dtype)


def _expert_tensors(module: nn.Module) -> tuple:
    """(first projection, down projection, their biases or None), the module's own parameters as they are (read
    past nn.Module's attribute fall-back: packed_experts.module_attribute)."""
    get = packed_experts.module_attribute
    first, down = get(module, "gate_up_proj" if module.has_gate else "up_proj"), get(module, "down_proj")
    if not module.has_bias:
        return first, down, None, None
    b_first = get(module, "gate_up_proj_bias" if module.has_gate else "up_proj_bias")
    return first, down, b_first, get(module, "down_proj_bias")


def _fused_backend_reason(op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``op`` would run on the slow torch reference for this device and dtype (None: a fused backend serves)."""
    chosen = resolve(op, "auto", device, dtype)
    if chosen in ("cpu", "triton"):
        return None
    return (
        f"no fused netmerge-fast backend runs {op} on {device.type} {str(dtype).removeprefix('torch.')} (auto would "
        f"pick the slow {chosen!r} reference); transformers' implementation kept"
    )


@torch.no_grad()
def _check_experts(module: nn.Module, plan: _ExpertsPlan) -> str | None:
    """Why the module's weights cannot run on moe_experts (None: they can), from its checks on an empty batch."""
    first, down, b_first, b_down = _expert_tensors(module)
    reason = _fused_backend_reason("moe_experts", first.device, first.dtype)
    if reason:
        return reason
    hidden = first.new_empty(0, first.shape[1] if module.is_transposed else first.shape[2])
    none = torch.empty(0, 1, device=first.device, dtype=torch.float32)  # not the default dtype: a test may set it
    try:
        moe_experts(
            hidden, first, down, none, none.long(), activation=plan.activation, gated=module.has_gate,
            b_gate_up=b_first, b_down=b_down, transposed=module.is_transposed, gate_up_interleaved=plan.interleaved,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        return f"moe_experts does not accept its weights: {exc}"
    return None


def _fallback(module: nn.Module, plan):
    """The implementation the model had, for modules we do not run (or expert-parallel ones)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    name = plan if isinstance(plan, str) else module.__dict__.get("_netmerge_previous", "eager")
    if name in (None, "eager", EXPERTS_IMPLEMENTATION):
        return type(module).forward.__wrapped__
    return ALL_EXPERTS_FUNCTIONS[name]


def _is_experts_module(module: nn.Module) -> bool:
    # Set by transformers' @use_experts_implementation on every experts module it can dispatch.
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "_is_expert_parallel")) and hasattr(
        type(module).forward, "__wrapped__"
    )


# --- public API ---------------------------------------------------------------------------------------------------


def _require_transformers():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as exc:
        raise ImportError("integrations.hf needs transformers 5: pip install 'netmerge-fast[hf]'") from exc
    if EXPERTS_IMPLEMENTATION not in ExpertsInterface._global_mapping:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, _experts_forward)


def enable(
    model: nn.Module, *, routing: bool = True, experts: bool = True, quantize_experts: str | None = None,
    release_weights: bool = False,
) -> HFPatchReport:  # fmt: skip
    """Run a Hugging Face transformers 5 MoE model's routers on ``topk_gating`` and its experts on ``moe_experts``.

    Args:
        model: a transformers ``PreTrainedModel`` (e.g. ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``,
            ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``, ``DeepseekV3ForCausalLM``, ``GptOssForCausalLM``,
            ``SwitchTransformersForConditionalGeneration``: see ``integrations.switch_transformers``).
        routing: patch the router modules' forward (their class, outputs and hooks stay).
        experts: select the ``"netmerge"`` experts implementation (``model.set_experts_implementation``). On CPU,
            calls that need no gradient run on a copy of each module's weights packed by ``pack_experts`` (made on
            the first such call, again whenever the weights change; it costs one more copy of the expert weights).
        quantize_experts: ``"int8"`` runs every experts call on int8 weights (weight-only, per output channel;
            a quarter of float32's bytes, half of bfloat16's), quantised on the first call; inference only
            (``NotImplementedError`` when a gradient is needed). ``None``: the model's own weights.
        release_weights: pack every experts module's weights now and free the originals, so a CPU inference model
            holds one copy of its expert weights (the packed one; int8 with ``quantize_experts``) instead of two.
            The weight parameters become ``meta`` placeholders; ``state_dict()`` / ``save_pretrained`` rebuild
            them from the packs (exactly for float; int8: the dequantised weights), ``disable`` restores them.
            Convert or move the model before ``enable``: ``.to()`` afterwards raises (at the next call for a
            dtype, at once for a device). Needs every experts module's weights as float32/bfloat16/float16 CPU
            tensors (``ValueError`` otherwise); inference only.

    Returns:
        An ``HFPatchReport``: the routers and experts modules now running on netmerge-fast, and each module left
        alone with the reason (also issued as a ``UserWarning``): a configuration netmerge-fast does not compute
        exactly as transformers does, or a device and dtype no fused backend (``cpu``, ``triton``) serves.

    No parameter, buffer or state_dict hook is touched: the model keeps its own tensors (so optimizer state made
    before ``enable`` stays valid). Calling ``enable`` again first undoes the previous call. Raises ``TypeError``
    for a model that is not an ``nn.Module`` (or flags that are not bools), ``ImportError`` without transformers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    _checks.boolean("routing", routing)
    _checks.boolean("experts", experts)
    if quantize_experts is not None:
        _checks.choice("quantize_experts", quantize_experts, packed_experts.QUANTIZATIONS)
        if not experts:
            raise ValueError("quantize_experts needs experts=True")
    _checks.boolean("release_weights", release_weights)
    if release_weights and not experts:
        raise ValueError("release_weights needs experts=True")
    _require_transformers()
    if getattr(model, "_netmerge_report", None) is not None:
        disable(model)
    if release_weights:
        for name, module in model.named_modules():
            if _is_experts_module(module):
                for w in _expert_tensors(module)[:2]:
                    if not packable(w):
                        raise ValueError(
                            "release_weights=True needs every experts module's weights as float32/bfloat16/float16 "
                            f"CPU tensors (the packed CPU kernels serve only those); {name} has {w.dtype} on {w.device}"
                        )
    report = HFPatchReport()
    if routing:
        _enable_routing(model, report)
    if experts:
        _enable_experts(model, report, quantize_experts, release_weights)
    switch_transformers.enable(model, report, routing=routing, experts=experts)
    if not report.changed and not report.skipped:
        report.skipped[""] = f"{type(model).__name__} has no MoE router or experts module that transformers dispatches"
    for name, why in report.skipped.items():
        warnings.warn(f"netmerge_fast.integrations.hf: left {name or 'the model'} untouched: {why}", stacklevel=2)
    model._netmerge_report = report
    return report


def _enable_routing(model: nn.Module, report: HFPatchReport) -> None:
    for name, module in model.named_modules():
        key = _router_key(module)
        entry = _ROUTERS.get(key) if key else None
        if entry is not None:
            forward, routing_of, logits_dtype = entry
            reason = _check_router(module, routing_of, logits_dtype)
            if reason:
                report.skipped[name] = reason
                continue
            module.forward = types.MethodType(forward, module)
            report.routers.append(name)
        elif _looks_like_router(module) and not _is_experts_module(module):
            report.skipped[name] = f"router class {type(module).__name__} is not known to netmerge-fast"


@torch.no_grad()
def _check_router(module: nn.Module, routing_of, logits_dtype: torch.dtype | None) -> str | None:
    """Why the router's configuration cannot run on topk_gating exactly and fast (None: it can), checked once by a
    call on an empty batch of its logits (the configuration is the module's, as transformers reads it)."""
    weight = module.weight
    dtype = logits_dtype or weight.dtype
    reason = _fused_backend_reason("topk_gating", weight.device, dtype)
    if reason:
        return reason
    try:
        topk_gating(weight.new_empty(0, weight.shape[0], dtype=dtype), **routing_of(module))
    except (ValueError, TypeError) as exc:
        return f"topk_gating does not accept its configuration: {exc}"
    return None


def _enable_experts(model: nn.Module, report: HFPatchReport, quantize: str | None, release: bool) -> None:
    modules = [(n, m) for n, m in model.named_modules() if _is_experts_module(m)]
    if not modules:
        return
    can_set = getattr(model, "set_experts_implementation", None)
    if can_set is None or not model._can_set_experts_implementation():
        for name, _ in modules:
            report.skipped[name] = f"{type(model).__name__} cannot switch its experts implementation"
        return
    previous = model.get_experts_implementation()
    for name, module in modules:
        plan = _plan_experts(module)
        module._netmerge_previous = module.config._experts_implementation
        reason = plan if isinstance(plan, str) else _check_experts(module, plan)
        if reason:
            report.skipped[name] = reason
            module._netmerge_plan = module._netmerge_previous
            continue
        plan.quantize = quantize
        module._netmerge_plan = plan
        report.experts.append(name)
        if release:
            packed_experts.release_weights(
                module, plan.packed, ("gate_up_proj" if module.has_gate else "up_proj", "down_proj"),
                quantize=quantize, transposed=module.is_transposed, gate_up_interleaved=plan.interleaved,
            )  # fmt: skip
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    report.previous_experts_implementation = previous


def disable(model: nn.Module) -> None:
    """Undo ``enable``: routers get their own forward back, experts their previous implementation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    report = getattr(model, "_netmerge_report", None)
    if report is None:
        return
    switch_transformers.disable(model, report)
    modules = dict(model.named_modules())
    for name in report.routers:
        modules[name].__dict__.pop("forward", None)
    for module in modules.values():
        packed_experts.restore_weights(module)
        module.__dict__.pop("_netmerge_plan", None)
        module.__dict__.pop("_netmerge_previous", None)
    if report.previous_experts_implementation is not None:
        model.set_experts_implementation(report.previous_experts_implementation)
    model._netmerge_report = None
