"""Switch Transformers in ``integrations.hf.enable``: the top-1 router with per-sequence expert capacity on
``topk_gating`` + ``apply_capacity``, the sparse MLP's experts on one ``moe_experts`` call.

transformers' ``SwitchTransformersTop1Router`` takes the argmax expert of each token's softmax, gives every
expert at most ``expert_capacity`` tokens of each sequence (earlier tokens first: a cumulative sum over the
sequence) and returns ``(one-hot dispatch mask, probability of the argmax [B, S, 1], router logits)``; the
``SwitchTransformersSparseMLP`` then runs its experts (separate ``nn.Linear`` pairs ``wi``/``wo``) on the tokens
the mask keeps, scaled by that probability, and gives dropped tokens 0 (the layer's residual passes them on).

Here the router's instance ``forward`` computes the same three outputs with ``topk_gating(k=1)`` and
``apply_capacity(group_size=S)``, so its hooks, ``output_router_logits`` and the z-loss / aux loss see what they
saw before; the sparse MLP's instance ``forward`` reads the router's mask and runs ``moe_experts`` on the experts'
own weights. No parameter is touched: the ``wi`` / ``wo`` weights stay separate ``nn.Linear`` modules (optimizer
state, checkpoints and ``disable`` stay trivial). With gradients, they are stacked per forward by a
differentiable ``torch.stack`` (one copy of the expert weights; their gradients reach every ``nn.Linear``);
without, the stack is made once and kept until a weight's storage or version counter changes (an optimizer
step, ``load_state_dict``, ``.to``), at the memory cost of one copy of the expert weights.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

from netmerge_fast.capacity import apply_capacity
from netmerge_fast.dispatch import moe_experts
from netmerge_fast.routing import topk_gating

_ROUTER = "SwitchTransformersTop1Router"
_SPARSE_MLP = "SwitchTransformersSparseMLP"


def _is(module: nn.Module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__.startswith("transformers.models.switch_transformers")


def _router_forward(self, hidden_states):
    """transformers' SwitchTransformersTop1Router.forward, on topk_gating and apply_capacity."""
    self.input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(self.dtype)
    if self.training and self.jitter_noise > 0:
        # The same draw, in place, as transformers: in float32 models the experts see the jittered input too.
        hidden_states *= torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    self.classifier = self.classifier.to(self.dtype)
    router_logits = self.classifier(hidden_states)
    E = router_logits.shape[-1]
    logits = router_logits.reshape(-1, E)
    if logits.dtype == torch.float32 and self.input_dtype == torch.float32:
        probs, ids = topk_gating(logits, 1, renormalize=False)
    else:
        # transformers takes the argmax of the probabilities rounded to the model's dtype (ties: lower index).
        probs, ids = torch.softmax(logits, dim=-1, dtype=self.dtype).to(self.input_dtype).max(-1, keepdim=True)
    kept, _ = apply_capacity(ids, probs, E, self.expert_capacity, group_size=router_logits.shape[-2])
    dispatch = torch.nn.functional.one_hot(kept[:, 0].long().clamp_min(0), E) * (kept >= 0)
    return (
        dispatch.view(router_logits.shape),
        probs.to(self.input_dtype).view(*router_logits.shape[:-1], 1),
        router_logits,
    )


@dataclass
class _Experts:
    """How to run a sparse MLP's experts on moe_experts, and the stacked weights of the last inference call."""

    activation: str
    dropout: float
    wi: list[nn.Parameter]
    wo: list[nn.Parameter]
    cache: tuple = field(default=(), repr=False)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([E, d_ff, d_model], [E, d_model, d_ff])``: moe_experts' layout is nn.Linear's, stacked."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.wi + self.wo):
            return torch.stack(self.wi), torch.stack(self.wo)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.wi + self.wo)
        if not self.cache or self.cache[0] != key:
            with torch.no_grad():
                self.cache = (key, torch.stack(self.wi), torch.stack(self.wo))
        return self.cache[1], self.cache[2]


def _sparse_mlp_forward(self, hidden_states):
    """transformers' SwitchTransformersSparseMLP.forward, the experts on one moe_experts call."""
    plan = self.__dict__["_netmerge_switch"]
    if self.training and plan.dropout > 0:
        return type(self).forward(self, hidden_states)  # dropout inside each expert: transformers' own loop
    shape = hidden_states.shape
    dispatch, probs, _ = self.router(hidden_states)
    dispatch = dispatch.reshape(-1, dispatch.shape[-1])
    ids = torch.where(dispatch.any(-1), dispatch.argmax(-1), -1)[:, None]
    w_in, w_out = plan.weights()
    weights = probs.reshape(-1, 1).to(torch.float64 if w_in.dtype == torch.float64 else torch.float32)
    x = hidden_states.reshape(-1, shape[-1]).to(w_in.dtype)
    out = moe_experts(x, w_in, w_out, weights, ids, activation=plan.activation, gated=False)
    return out.to(hidden_states.dtype).view(shape)


def _plan(module: nn.Module) -> _Experts | str:
    """How to run this sparse MLP's experts, or why they cannot be run exactly and fast."""
    from netmerge_fast.integrations.hf import _activation_of, _fused_backend_reason

    experts = [module.experts[f"expert_{e}"] for e in range(module.router.num_experts)]
    activation = _activation_of(types.SimpleNamespace(act_fn=experts[0].act))
    if activation is None:
        return f"activation {type(experts[0].act).__name__} is not supported"
    wi = [expert.wi.weight for expert in experts]
    wo = [expert.wo.weight for expert in experts]
    if any(expert.wi.bias is not None or expert.wo.bias is not None for expert in experts):
        return "experts with biases are not what transformers builds"
    first = wi[0]
    if not first.is_floating_point() or any((p.dtype, p.device) != (first.dtype, first.device) for p in wi + wo):
        return "the experts' weights must share one floating dtype and device"
    if any(type(expert.act) is not type(experts[0].act) for expert in experts):
        return "the experts have different activations"
    reason = _fused_backend_reason("moe_experts", first.device, first.dtype)
    if reason:
        return reason
    return _Experts(activation, float(experts[0].dropout.p), wi, wo)


def _router_reason(module: nn.Module) -> str | None:
    """Why the router cannot run exactly and fast (None: it can)."""
    from netmerge_fast.integrations.hf import _fused_backend_reason

    capacity = module.expert_capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        return f"expert_capacity must be an int >= 0, got {capacity!r}"
    device = module.classifier.weight.device
    ops = [("apply_capacity", module.classifier.weight.dtype)]
    if module.dtype == torch.float32:  # float32 logits route on topk_gating (others on transformers' argmax)
        ops.append(("topk_gating", torch.float32))
    for op, dtype in ops:
        reason = _fused_backend_reason(op, device, dtype)
        if reason:
            return reason
    return None


def enable(model: nn.Module, report, *, routing: bool, experts: bool) -> None:
    """Patch the model's Switch Transformers routers and sparse MLPs, recording them in ``report``."""
    for name, module in model.named_modules():
        if _is(module, _ROUTER):
            report.skipped.pop(name, None)  # hf's router scan marks every router class it does not know
            reason = _router_reason(module) if routing else None
            if reason:
                report.skipped[name] = reason
            elif routing:
                module.forward = types.MethodType(_router_forward, module)
                report.routers.append(name)
        elif _is(module, _SPARSE_MLP) and experts:
            plan = _plan(module)
            if isinstance(plan, str):
                report.skipped[name] = plan
                continue
            module._netmerge_switch = plan
            module.forward = types.MethodType(_sparse_mlp_forward, module)
            report.experts.append(name)


def disable(model: nn.Module, report) -> None:
    """Undo ``enable`` on the sparse MLPs (hf.disable restores the routers' forward)."""
    modules = dict(model.named_modules())
    for name in report.experts:
        module = modules[name]
        if "_netmerge_switch" in module.__dict__:
            module.__dict__.pop("_netmerge_switch")
            module.__dict__.pop("forward", None)
