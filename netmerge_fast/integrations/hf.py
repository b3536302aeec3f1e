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

GPT-OSS stores its experts transposed with gate and up interleaved. At ``enable`` the same Parameter objects get
our layout in place (gate columns then up columns, storage ``[E, 2I, H]`` / ``[E, H, I]``, shapes unchanged), so
no call converts anything; the module's ``_apply_gate`` and ``state_dict`` / ``load_state_dict`` follow, so every
experts implementation still computes the same function and checkpoints keep Hugging Face's order. ``disable``
converts back. Build optimizers after ``enable`` (or ``disable``): optimizer state made before holds the old
column order.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from netmerge_fast import _checks, packed_experts, reference
from netmerge_fast.dispatch import moe_experts, run_validated
from netmerge_fast.routing import topk_gating

__all__ = ["EXPERTS_IMPLEMENTATION", "HFPatchReport", "disable", "enable"]

EXPERTS_IMPLEMENTATION = "netmerge"


@dataclass
class HFPatchReport:
    """What ``enable`` changed: module names (as in ``model.named_modules()``) and why others were left alone."""

    routers: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    relayout: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    previous_experts_implementation: dict | None = None

    @property
    def changed(self) -> bool:
        return bool(self.routers or self.experts)


# --- routing ------------------------------------------------------------------------------------------------------


def _softmax_router(cast_weights: bool):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE: softmax over all experts, top-k, renormalised if norm_topk_prob.

    Mixtral always renormalises and returns float32 weights; the others cast the weights to the logits' dtype.
    """

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        # Mixtral has no norm_topk_prob (it always renormalises); read __dict__ to skip nn.Module's slow miss.
        weights, ids = topk_gating(logits, self.top_k, renormalize=bool(self.__dict__.get("norm_topk_prob", True)))
        if cast_weights:
            weights = weights.to(logits.dtype)
        return logits, weights, ids.long()

    return forward


def _deepseek_v3_router(self, hidden_states):
    """Sigmoid scores, e_score_correction_bias for selection, top-2-sum group limiting, routed_scaling_factor."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim).float(), self.weight.float())
    weights, ids = topk_gating(
        logits,
        self.top_k,
        scoring="sigmoid",
        renormalize=bool(self.norm_topk_prob),
        bias=self.e_score_correction_bias,
        num_groups=self.num_group,
        topk_groups=self.topk_group,
        group_score="top2_sum",
        scale=float(self.routed_scaling_factor),
    )
    return logits, weights, ids.long()


def _gpt_oss_router(self, hidden_states):
    """Top-k on the biased logits, softmax over the k chosen (in the logits' dtype, as GPT-OSS)."""
    logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
    weights, ids = topk_gating(logits, self.top_k, softmax_after_topk=True)
    return logits, weights.to(logits.dtype), ids.long()


# (module of the modeling file, router class) -> forward that replaces the instance's.
_ROUTERS = {
    ("mixtral", "MixtralTopKRouter"): _softmax_router(cast_weights=False),
    ("qwen2_moe", "Qwen2MoeTopKRouter"): _softmax_router(cast_weights=True),
    ("qwen3_moe", "Qwen3MoeTopKRouter"): _softmax_router(cast_weights=True),
    ("olmoe", "OlmoeTopKRouter"): _softmax_router(cast_weights=True),
    ("deepseek_v3", "DeepseekV3TopkRouter"): _deepseek_v3_router,
    ("gpt_oss", "GptOssTopKRouter"): _gpt_oss_router,
}
_UNSUPPORTED = {
    "SwitchTransformersTop1Router": "Switch Transformers routes top-1 with a per-sequence expert capacity "
    "(tokens over capacity are dropped) and keeps its experts as separate nn.Linear modules: not supported",
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
    interleaved: bool  # GPT-OSS: gate/up columns were reordered at enable (state_dict hooks undo it)
    handles: list = field(default_factory=list)
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


def _first_weight_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def _to_concatenated(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[..., ::2], x[..., 1::2]], dim=-1)


def _to_interleaved(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.stack([x[..., :half], x[..., half:]], dim=-1).flatten(-2)


@torch.no_grad()
def _relayout(module: nn.Module, plan: _ExpertsPlan) -> None:
    """Give transposed experts our storage (``[E, out, in]`` contiguous) under their own shapes, once."""
    first = getattr(module, _first_weight_name(module))
    if plan.interleaved:
        first.data = _to_concatenated(first.data).transpose(1, 2).contiguous().transpose(1, 2)
        module.gate_up_proj_bias.data = _to_concatenated(module.gate_up_proj_bias.data).contiguous()
        # Every experts implementation calls _apply_gate: make it read the new column order.
        cls_gate = type(module)._apply_gate
        module._apply_gate = types.MethodType(lambda self, gu: cls_gate(self, _to_interleaved(gu)), module)
        plan.handles.append(module._register_state_dict_hook(_state_dict_to_hf))
        plan.handles.append(module.register_load_state_dict_pre_hook(_load_from_hf))
    else:
        first.data = first.data.transpose(1, 2).contiguous().transpose(1, 2)
    module.down_proj.data = module.down_proj.data.transpose(1, 2).contiguous().transpose(1, 2)


@torch.no_grad()
def _restore_layout(module: nn.Module, plan: _ExpertsPlan) -> None:
    for handle in plan.handles:
        handle.remove()
    first = getattr(module, _first_weight_name(module))
    if plan.interleaved:
        first.data = _to_interleaved(first.data).contiguous()
        module.gate_up_proj_bias.data = _to_interleaved(module.gate_up_proj_bias.data).contiguous()
        module.__dict__.pop("_apply_gate", None)
    else:
        first.data = first.data.contiguous()
    module.down_proj.data = module.down_proj.data.contiguous()


def _state_dict_to_hf(module, state_dict, prefix, _metadata):
    for name in ("gate_up_proj", "gate_up_proj_bias"):
        if prefix + name in state_dict:
            state_dict[prefix + name] = _to_interleaved(state_dict[prefix + name]).contiguous()
    return state_dict


def _load_from_hf(module, state_dict, prefix, *_args):
    for name in ("gate_up_proj", "gate_up_proj_bias"):
        if prefix + name in state_dict:
            state_dict[prefix + name] = _to_concatenated(state_dict[prefix + name])


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``"netmerge"`` experts implementation: one ``moe_experts`` call on the module's own parameters."""
    plan = self.__dict__.get("_netmerge_plan")
    if not isinstance(plan, _ExpertsPlan) or self._is_expert_parallel:
        return _fallback(self, plan)(self, hidden_states, top_k_index, top_k_weights)
    first = getattr(self, "gate_up_proj" if self.has_gate else "up_proj")
    down = self.down_proj
    if self.is_transposed:  # views of the [E, out, in] storage made at enable
        first, down = first.transpose(1, 2), down.transpose(1, 2)
    b_first = b_down = None
    if self.has_bias:
        b_first = self.gate_up_proj_bias if self.has_gate else self.up_proj_bias
        b_down = self.down_proj_bias
    # The weights were checked at enable and the ids come from a router's top-k: skip moe_experts' per-call checks.
    x = hidden_states.to(first.dtype)
    weights = (first, down)
    if plan.quantize is not None or packed_experts.runs_packed(
        x, first, "auto", x, top_k_weights, *weights, b_first, b_down
    ):
        weights = (plan.packed.get(first, down, quantize=plan.quantize), None)  # CPU inference, or int8: packed once
    out = run_validated(
        x, *weights, top_k_weights.float(), top_k_index, plan.activation, self.has_gate, b_first, b_down, False, "auto"
    )
    return out.to(hidden_states.dtype)


@torch.no_grad()
def _check_weights(module: nn.Module, plan: _ExpertsPlan) -> None:
    """Put the module's weights through moe_experts' checks once, on an empty batch."""
    first = getattr(module, _first_weight_name(module))
    down = module.down_proj
    if module.is_transposed:
        first, down = first.transpose(1, 2), down.transpose(1, 2)
    b_first = getattr(module, _first_weight_name(module) + "_bias") if module.has_bias else None
    b_down = module.down_proj_bias if module.has_bias else None
    hidden = first.new_empty(0, first.shape[2])
    none = torch.empty(0, 1, device=first.device)
    moe_experts(hidden, first, down, none, none.long(), activation=plan.activation, gated=module.has_gate,
                b_gate_up=b_first, b_down=b_down)  # fmt: skip


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
    model: nn.Module, *, routing: bool = True, experts: bool = True, quantize_experts: str | None = None
) -> HFPatchReport:
    """Run a Hugging Face transformers 5 MoE model's routers on ``topk_gating`` and its experts on ``moe_experts``.

    Args:
        model: a transformers ``PreTrainedModel`` (e.g. ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``,
            ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM``, ``DeepseekV3ForCausalLM``, ``GptOssForCausalLM``).
        routing: patch the router modules' forward (their class, outputs and hooks stay).
        experts: select the ``"netmerge"`` experts implementation (``model.set_experts_implementation``). On CPU,
            calls that need no gradient run on a copy of each module's weights packed by ``pack_experts`` (made on
            the first such call, again whenever the weights change; it costs one more copy of the expert weights).
        quantize_experts: ``"int8"`` runs every experts call on int8 weights (weight-only, per output channel;
            a quarter of float32's bytes, half of bfloat16's), quantised on the first call; inference only
            (``NotImplementedError`` when a gradient is needed). ``None``: the model's own weights.

    Returns:
        An ``HFPatchReport``: the routers and experts modules now running on netmerge-fast, the GPT-OSS experts whose
        layout was converted, and each module left alone with the reason (also issued as a ``UserWarning``).

    Calling ``enable`` again first undoes the previous call. Raises ``TypeError`` for a model that is not an
    ``nn.Module`` (or flags that are not bools), ``ImportError`` without transformers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    _checks.boolean("routing", routing)
    _checks.boolean("experts", experts)
    if quantize_experts is not None:
        _checks.choice("quantize_experts", quantize_experts, packed_experts.QUANTIZATIONS)
        if not experts:
            raise ValueError("quantize_experts needs experts=True")
    _require_transformers()
    if getattr(model, "_netmerge_report", None) is not None:
        disable(model)
    report = HFPatchReport()
    if routing:
        _enable_routing(model, report)
    if experts:
        _enable_experts(model, report, quantize_experts)
    if not report.changed and not report.skipped:
        report.skipped[""] = f"{type(model).__name__} has no MoE router or experts module that transformers dispatches"
    for name, why in report.skipped.items():
        warnings.warn(f"netmerge_fast.integrations.hf: left {name or 'the model'} untouched: {why}", stacklevel=2)
    model._netmerge_report = report
    return report


def _enable_routing(model: nn.Module, report: HFPatchReport) -> None:
    for name, module in model.named_modules():
        key = _router_key(module)
        forward = _ROUTERS.get(key) if key else None
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            report.routers.append(name)
        elif type(module).__name__ in _UNSUPPORTED:
            report.skipped[name] = _UNSUPPORTED[type(module).__name__]
        elif _looks_like_router(module) and not _is_experts_module(module):
            report.skipped[name] = f"router class {type(module).__name__} is not known to netmerge-fast"


def _enable_experts(model: nn.Module, report: HFPatchReport, quantize: str | None) -> None:
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
        if isinstance(plan, str):
            report.skipped[name] = plan
            module._netmerge_plan = module._netmerge_previous
            continue
        if module.is_transposed:
            _relayout(module, plan)
            report.relayout.append(name)
        _check_weights(module, plan)
        plan.quantize = quantize
        module._netmerge_plan = plan
        report.experts.append(name)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    report.previous_experts_implementation = previous


def disable(model: nn.Module) -> None:
    """Undo ``enable``: routers get their own forward back, experts their previous implementation and layout."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    report = getattr(model, "_netmerge_report", None)
    if report is None:
        return
    modules = dict(model.named_modules())
    for name in report.routers:
        modules[name].__dict__.pop("forward", None)
    for module in modules.values():
        plan = module.__dict__.pop("_netmerge_plan", None)
        module.__dict__.pop("_netmerge_previous", None)
        if isinstance(plan, _ExpertsPlan) and module.is_transposed:
            _restore_layout(module, plan)
    if report.previous_experts_implementation is not None:
        model.set_experts_implementation(report.previous_experts_implementation)
    model._netmerge_report = None
