"""SparseMoE: a drop-in sparse mixture-of-experts layer (router + fused top-k gating + grouped expert dispatch)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn

from netmerge_fast import _checks, packed_experts, reference
from netmerge_fast.capacity import apply_capacity, expert_capacity
from netmerge_fast.dispatch import ACTIVATIONS, moe_experts, run_validated
from netmerge_fast.routing import expert_counts, load_balancing_loss, router_z_loss, slot_probabilities, topk_gating

__all__ = ["MoEExperts", "RouterStats", "SharedExpert", "SparseMoE"]


def _uniform_(weight: torch.Tensor, fan_in: int) -> None:
    """nn.Linear's default initialisation, per expert."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(weight, -bound, bound)


class MoEExperts(nn.Module):
    """The E expert MLPs as 3-D parameters in Hugging Face transformers 5's layout (and key names).

    ``gate_up_proj [E, 2I, H]`` (gate rows then up rows; ``[E, I, H]`` when not gated), ``down_proj [E, H, I]``,
    with ``bias``: ``gate_up_proj_bias [E, 2I]`` and ``down_proj_bias [E, H]``.

    On CPU, a call that needs no gradient (``torch.no_grad()``, ``inference_mode``, or weights with
    ``requires_grad=False``) runs on a copy of the weights packed by ``pack_experts``, made on the first such call
    and again whenever a weight changes (an optimizer step, ``load_state_dict``, ``.to()``: the parameters'
    version counters and storage are checked on each call). It costs one more copy of the expert weights in memory
    (``packed_nbytes``); ``quantize_experts("int8")`` makes that copy int8 (a quarter of float32) and runs every
    call on it. Calls that need gradients run on the parameters themselves.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        *,
        activation: str = "silu",
        gated: bool = True,
        bias: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.gated, self.backend = activation, gated, backend
        width = 2 * intermediate_size if gated else intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.quantize: str | None = None
        self.group_size: int | None = None
        self._pack_cache = packed_experts.PackCache()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.gate_up_proj, self.hidden_size)
        _uniform_(self.down_proj, self.intermediate_size)
        if self.gate_up_proj_bias is not None:
            _uniform_(self.gate_up_proj_bias, self.hidden_size)
            _uniform_(self.down_proj_bias, self.intermediate_size)

    def quantize_experts(self, mode: str | None = "int8", *, group_size: int | None = None) -> None:
        """Run every call on int8 experts (weight-only, symmetric, float32 scales per output channel or per
        ``group_size`` inputs), quantised from the current weights now and again whenever they change;
        ``None`` goes back to the float weights. Inference only: a call that needs a gradient raises
        ``NotImplementedError``."""
        if mode is not None:
            _checks.choice("mode", mode, packed_experts.QUANTIZATIONS)
        if group_size is not None:
            if mode is None:
                raise ValueError("group_size needs mode='int8'")
            _checks.integer("group_size", group_size, low=1)
        released = packed_experts.restore_weights(self) is not None
        self.quantize, self.group_size = mode, group_size
        self._pack_cache.clear()
        if released:
            self.release_weights()
        elif mode is not None:
            self.packed()

    def release_weights(self) -> None:
        """Pack the weights now and free ``gate_up_proj`` / ``down_proj`` (CPU inference only): from then on the
        module holds one copy of its expert weights, the packed one (int8 after ``quantize_experts``).

        The two parameters become ``meta`` placeholders of the same shape and dtype; their memory is returned once
        nothing else (an optimizer, the caller) holds them. ``state_dict()`` still gives the weights (rebuilt from
        the pack: exactly for float, the dequantised weights for int8), ``load_state_dict`` and ``.to(dtype)``
        restore, apply and release again, ``quantize_experts`` re-packs; a call that needs a gradient raises
        ``NotImplementedError``. ``restore_weights()`` gives the parameters back. Raises ``ValueError`` unless the
        weights are float32/bfloat16/float16 CPU tensors.
        """
        packed_experts.release_weights(self, self._pack_cache, quantize=self.quantize, group_size=self.group_size)

    def restore_weights(self) -> None:
        """Undo ``release_weights``: the parameters again, rebuilt from the pack (int8: the dequantised weights)."""
        packed_experts.restore_weights(self)

    @property
    def weights_released(self) -> bool:
        """Whether ``release_weights`` freed the weight parameters."""
        return packed_experts.is_released(self)

    def packed(self) -> packed_experts.PackedExperts:
        """The weights packed by ``pack_experts`` (int8 after ``quantize_experts``), made again if they changed."""
        return self._packed(*(packed_experts.module_attribute(self, name) for name in self._WEIGHTS[:2]))

    def _packed(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> packed_experts.PackedExperts:
        return self._pack_cache.get(w_gate_up, w_down, quantize=self.quantize, group_size=self.group_size)

    @property
    def packed_nbytes(self) -> int:
        """Bytes held by the packed copy of the weights (0 before the first call that uses it)."""
        return self._pack_cache.nbytes

    def _apply(self, fn, recurse=True):
        released = packed_experts.restore_weights(self) is not None  # .to(dtype) converts the real weights
        self._pack_cache.clear()  # .to() / .half() / ...: the packed copy is of the old weights
        result = super()._apply(fn, recurse)
        if released and packed_experts.packable(self.gate_up_proj):  # else (e.g. moved to a GPU) stays restored
            self.release_weights()
        return result

    _WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, checked: bool = True
    ) -> torch.Tensor:
        """``moe_experts`` on the module's weights; ``checked=False`` skips its per-call checks, for routings that
        are valid by construction (SparseMoE's own top-k: a decode step then does not pay them)."""
        w_gate_up, w_down, b_gate_up, b_down = (packed_experts.module_attribute(self, n) for n in self._WEIGHTS)
        weights = (w_gate_up, w_down)
        # The parameters only matter (and are only listed: ~5 us) where a gradient could flow.
        needs_grad = (hidden, topk_weights, *self.parameters()) if torch.is_grad_enabled() else ()
        if (
            self.quantize is not None
            or packed_experts.is_released(self)
            or packed_experts.runs_packed(hidden, w_gate_up, self.backend, *needs_grad)
        ):
            weights = (self._packed(w_gate_up, w_down), None)
        if not checked:
            return run_validated(
                hidden, *weights, topk_weights, topk_ids, self.activation, self.gated, b_gate_up, b_down, False,
                self.backend,
            )  # fmt: skip
        return moe_experts(
            hidden,
            *weights,
            topk_weights,
            topk_ids,
            activation=self.activation,
            gated=self.gated,
            b_gate_up=b_gate_up,
            b_down=b_down,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        quantized = f", quantize={self.quantize!r}" if self.quantize else ""
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, gated={self.gated}"
            f"{quantized}"
        )


class SharedExpert(nn.Module):
    """A dense gated MLP every token goes through (Qwen2-MoE's ``shared_expert``, DeepSeek's ``shared_experts``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu") -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(reference.gated_activation(self.activation, self.gate_proj(x), self.up_proj(x)))


class RouterStats(NamedTuple):
    """One forward's routing, as device tensors (reading them is the only host sync).

    ``tokens_per_expert [E]`` int64: slots the router chose for each expert (before capacity); ``dropped [E]``
    int64: of those, the slots over the expert's capacity; ``load_cv`` float32 scalar: coefficient of variation
    of ``tokens_per_expert`` (population std / mean; 0 for an empty batch), 0 when perfectly balanced.
    """

    tokens_per_expert: torch.Tensor
    dropped: torch.Tensor
    load_cv: torch.Tensor

    @property
    def dispatched(self) -> torch.Tensor:
        """[E] int64: slots each expert computed (``tokens_per_expert - dropped``)."""
        return self.tokens_per_expert - self.dropped


def load_cv(load: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation (population std / mean) of per-expert loads, float32; 0 when the mean is 0."""
    load = load.float()
    mean = load.mean()
    return torch.where(mean > 0, load.std(correction=0) / mean.clamp_min(1e-30), 0.0)


class SparseMoE(nn.Module):
    """Router (``nn.Linear``) + ``topk_gating`` + ``moe_experts``, with an optional shared expert.

    Accepts ``[..., H]`` and returns the same shape. The state_dict keys are those of Hugging Face transformers 5's
    MoE blocks, so their weights load as they are: ``gate.weight`` ``[E, H]``, ``experts.gate_up_proj``
    ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3's routed part);
    with ``bias=True`` also ``experts.gate_up_proj_bias`` / ``experts.down_proj_bias``; with a shared expert
    ``shared_expert.{gate,up,down}_proj.weight`` and, with ``shared_expert_gate=True``,
    ``shared_expert_gate.weight`` ``[1, H]`` (Qwen2-MoE: the shared output is scaled by its sigmoid). With
    ``selection_bias=True``, ``gate.e_score_correction_bias`` ``[E]`` (DeepSeek-V3) is added to the scores for
    selection only.

    Args:
        hidden_size, intermediate_size, num_experts, top_k: H, I (per expert), E and k.
        activation, gated, bias: the experts' MLP (see ``moe_experts``); ``bias`` gives the experts biases.
        scoring, renormalize, num_groups, topk_groups, group_score, scale: the routing (see ``topk_gating``).
        shared_expert_size: intermediate size of the shared expert (``None``: none).
        shared_expert_gate: scale the shared expert's output by ``sigmoid(shared_expert_gate(x))``.
        router_bias: give the router a bias. selection_bias: DeepSeek-V3's ``e_score_correction_bias``.
        softmax_after_topk: GPT-OSS routing (top-k on logits, softmax over the k).
        aux_loss_coef, z_loss_coef: coefficients of ``aux_loss()``.
        capacity_factor: ``> 0``: each expert takes at most ``ceil(capacity_factor * N * k / E)`` of the N tokens'
            slots of a call and the rest are dropped (their weight 0: a dropped token's output is the shared
            expert's, or 0 - add a residual around the layer, as Switch does); ``0`` or ``None``: dropless.
        capacity_order: which slots an expert keeps (``apply_capacity``): ``"token"`` (earlier tokens, Switch) or
            ``"score"`` (higher router probability, GShard / batch-prioritised routing).
        bias_update_rate: with ``selection_bias``, the step of ``update_selection_bias()`` (DeepSeek-V3's gamma).
        backend: passed to every op.

    After each forward, ``router_logits`` holds the last ``[N, E]`` router logits, ``topk_ids`` the router's
    choices (before capacity), ``dispatched_ids`` the ids the experts ran (-1: dropped) and ``router_stats`` a
    ``RouterStats`` (tokens per expert, dropped slots, the load's coefficient of variation; no host sync).
    ``aux_loss()`` is ``aux_loss_coef * load_balancing_loss + z_loss_coef * router_z_loss`` on the logits and
    the router's choices.

    Aux-loss-free balancing (DeepSeek-V3): with ``selection_bias=True`` every training-mode forward adds its
    ``tokens_per_expert`` to the buffer ``expert_load``; ``update_selection_bias()`` (call it after each
    optimizer step) moves ``gate.e_score_correction_bias`` by ``bias_update_rate * sign(mean_load - load_e)``
    and clears ``expert_load``. The bias is a buffer (saved in the state_dict, no gradient); ``expert_load`` is
    not saved (it only spans one optimizer step), so the state_dict keys stay Hugging Face's.

    Routing replay: ``moe(x, replay_ids=ids)`` or ``with moe.replay(ids):`` uses the given router choices
    (``[N, k]``, e.g. recorded by ``with moe.record_routing() as calls:``) instead of selecting; capacity is
    applied after, as in the recorded call.

    Example (Qwen3-30B-A3B)::

        moe = SparseMoE(2048, 768, num_experts=128, top_k=8)
        moe.load_state_dict(hf_block.state_dict())
        y = moe(x)                       # x: [batch, seq, 2048]
        loss = task_loss + moe.aux_loss()
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        activation: str = "silu",
        gated: bool = True,
        bias: bool = False,
        scoring: str = "softmax",
        renormalize: bool = True,
        num_groups: int = 1,
        topk_groups: int | None = None,
        group_score: str = "max",
        scale: float = 1.0,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
        router_bias: bool = False,
        selection_bias: bool = False,
        softmax_after_topk: bool = False,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        capacity_order: str = "token",
        bias_update_rate: float = 1e-3,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            _checks.integer(name, value, low=1)
        _checks.integer("num_experts", num_experts, low=1)
        _checks.integer("top_k", top_k, low=1, high=num_experts)
        _checks.choice("activation", activation, ACTIVATIONS)
        if shared_expert_size is not None:
            _checks.integer("shared_expert_size", shared_expert_size, low=1)
        elif shared_expert_gate:
            raise ValueError("shared_expert_gate=True needs a shared expert (shared_expert_size)")
        self.num_experts, self.top_k = num_experts, top_k
        self.routing = {
            "scoring": scoring,
            "renormalize": renormalize,
            "num_groups": num_groups,
            "topk_groups": topk_groups,
            "group_score": group_score,
            "softmax_after_topk": softmax_after_topk,
            "scale": scale,
        }
        self.aux_loss_coef = _checks.finite_real("aux_loss_coef", aux_loss_coef)
        self.z_loss_coef = _checks.finite_real("z_loss_coef", z_loss_coef)
        if capacity_factor is not None and _checks.finite_real("capacity_factor", capacity_factor) < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 or None: dropless), got {capacity_factor}")
        self.capacity_factor = capacity_factor
        self.capacity_order = _checks.choice("capacity_order", capacity_order, ("token", "score"))
        if _checks.finite_real("bias_update_rate", bias_update_rate) < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate}")
        self.bias_update_rate = float(bias_update_rate)
        self.backend = backend
        self.gate = nn.Linear(hidden_size, num_experts, bias=router_bias)
        if selection_bias:
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(num_experts))
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.experts = MoEExperts(
            hidden_size, intermediate_size, num_experts, activation=activation, gated=gated, bias=bias, backend=backend
        )
        self.shared_expert = (
            SharedExpert(hidden_size, shared_expert_size, activation) if shared_expert_size is not None else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        self.router_logits: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None
        self.dispatched_ids: torch.Tensor | None = None
        self._stats: tuple | RouterStats | None = None  # the last forward's (ids, load, dropped), or its stats
        self._replaying: Iterator[torch.Tensor] | None = None
        self._recording: list[torch.Tensor] | None = None
        # Checks the routing arguments once, at construction.
        topk_gating(torch.zeros(1, num_experts), top_k, **self._routing_args(), backend="torch")

    def _routing_args(self) -> dict:
        gate = packed_experts.module_attribute(self, "gate")
        return dict(self.routing, bias=packed_experts.module_attribute(gate, "e_score_correction_bias", None))

    def forward(self, x: torch.Tensor, replay_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., H]`` -> same shape. ``replay_ids [N, k]`` (N = tokens of x): use these router choices."""
        shape = x.shape
        flat = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        if replay_ids is None and self._replaying is not None:
            replay_ids = next(self._replaying, None)
            if replay_ids is None:
                raise RuntimeError("moe.replay(...): more forward calls than recorded routings")
        routing = dict(self._routing_args(), backend=self.backend)
        weights, ids = topk_gating(logits, self.top_k, **routing, replay_ids=replay_ids)
        dispatched, dropped = ids, None
        capacity = None  # dropless unless a positive factor (expert_capacity would say so, at ~2 us a call)
        if self.capacity_factor:
            capacity = expert_capacity(flat.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        if capacity is not None:
            priority = slot_probabilities(logits, ids, routing) if self.capacity_order == "score" else None
            dispatched, weights, dropped = apply_capacity(
                ids, weights, self.num_experts, capacity, self.capacity_order, self.backend, priority=priority,
                return_dropped=True,
            )  # fmt: skip
        out = self.experts(flat, weights, dispatched, checked=False)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        # The statistics are made when read (router_stats): a decode step does not pay their half-dozen small ops.
        load = None
        if self.training and hasattr(self, "expert_load"):
            load = expert_counts(ids, self.num_experts)
            self.expert_load.add_(load)
        # Plain attributes (set in __init__, never parameters or buffers), written past nn.Module.__setattr__'s
        # registry checks: ~1.5 us each, on every decode step of every layer.
        vars(self).update(router_logits=logits, topk_ids=ids, dispatched_ids=dispatched, _stats=(ids, load, dropped))
        if self._recording is not None:
            self._recording.append(ids.detach())
        return out if x.dim() == 2 else out.reshape(shape)

    @property
    def router_stats(self) -> RouterStats | None:
        """The last forward's ``RouterStats`` (None before the first), computed from its routing when read."""
        if self._stats is None or isinstance(self._stats, RouterStats):
            return self._stats
        ids, load, dropped = self._stats
        if load is None:
            load = expert_counts(ids, self.num_experts)
        if dropped is None:
            dropped = torch.zeros_like(load)
        self._stats = RouterStats(load, dropped, load_cv(load))
        return self._stats

    def quantize_experts(self, mode: str | None = "int8", *, group_size: int | None = None) -> None:
        """Run the experts on int8 weights (see ``MoEExperts.quantize_experts``); ``None`` undoes it."""
        self.experts.quantize_experts(mode, group_size=group_size)

    def release_expert_weights(self) -> None:
        """Keep only the packed copy of the expert weights (see ``MoEExperts.release_weights``)."""
        self.experts.release_weights()

    def restore_expert_weights(self) -> None:
        """Undo ``release_expert_weights`` (see ``MoEExperts.restore_weights``)."""
        self.experts.restore_weights()

    @torch.no_grad()
    def update_selection_bias(self) -> None:
        """DeepSeek-V3's aux-loss-free step: ``bias_e += rate * sign(mean_load - load_e)`` over the loads of the
        training forwards since the last call, then clear them. On the device, no host sync, no gradient."""
        if not hasattr(self, "expert_load"):
            raise RuntimeError("update_selection_bias() needs SparseMoE(..., selection_bias=True)")
        load = self.expert_load.double()
        bias = self.gate.e_score_correction_bias
        bias.add_((self.bias_update_rate * torch.sign(load.mean() - load)).to(bias.dtype))
        self.expert_load.zero_()

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[list[torch.Tensor]]:
        """Collect the router's choices (``topk_ids``, before capacity) of every forward in the block, in order."""
        calls: list[torch.Tensor] = []
        previous, self._recording = self._recording, calls
        try:
            yield calls
        finally:
            self._recording = previous

    @contextlib.contextmanager
    def replay(self, ids: torch.Tensor | Sequence[torch.Tensor]) -> Iterator[None]:
        """Forwards in the block use recorded router choices instead of selecting: one ``[N, k]`` tensor for
        every call, or a sequence of them consumed one per call (more calls than entries: RuntimeError)."""
        if isinstance(ids, torch.Tensor):
            source = iter(lambda: ids, None)
        else:
            source = iter(list(ids))
        previous, self._replaying = self._replaying, source
        try:
            yield
        finally:
            self._replaying = previous

    def aux_loss(self) -> torch.Tensor:
        """``aux_loss_coef * load_balancing_loss + z_loss_coef * router_z_loss`` of the last forward."""
        if self.router_logits is None:
            raise RuntimeError("aux_loss() needs a forward pass first")
        loss = self.aux_loss_coef * load_balancing_loss(self.router_logits, self.topk_ids, self.num_experts)
        if self.z_loss_coef:
            loss = loss + self.z_loss_coef * router_z_loss(self.router_logits)
        return loss
