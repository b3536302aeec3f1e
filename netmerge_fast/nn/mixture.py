"""Deep Mixture of Experts (Eigen, Ranzato & Sutskever 2013): stacked gated mixture layers, dense or top-k, with
the paper's balancing constraint."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from netmerge_fast import _checks, reference
from netmerge_fast.grouped_linear import LINEAR_ACTIVATIONS, grouped_linear
from netmerge_fast.nn.sparse_moe import _uniform_
from netmerge_fast.routing import topk_gating

__all__ = ["DeepMoE", "MixtureLayer"]

_ACTIVATION_MODULES = {
    "none": nn.Identity,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


def _margin(value: object) -> float | None:
    if value is None:
        return None
    margin = _checks.finite_real("balance_margin", value)
    if margin < 0:
        raise ValueError(f"balance_margin must be None or >= 0, got {margin}")
    return margin


class MixtureLayer(nn.Module):
    """One mixture layer: E experts ``f_i(x) = act(W_i x + b_i)`` weighted by a gate
    ``g(x) = softmax(B act(A x + a) + b)`` with one hidden layer of ``gate_hidden`` units.

    ``top_k=None`` is the paper's dense (soft) mixture ``z = sum_i g_i(x) f_i(x)``: every expert runs, as one
    matmul over all E experts. ``top_k=k`` keeps the k largest gate values, renormalised (``topk_gating``), and runs
    only those experts (``grouped_linear``, on the grouped dispatch of ``moe_experts``); ``top_k=E`` equals the
    dense layer.

    Args:
        in_features, out_features: widths of the input (after flattening from dim 1) and of every expert's output.
        num_experts: E.
        gate_hidden: hidden units of the gate.
        top_k: ``None`` (dense) or k in ``[1, E]``.
        activation: of the experts and of the gate's hidden layer: ``"relu"`` (the paper's), ``"none"``,
            ``"silu"``, ``"gelu"`` or ``"gelu_tanh"``.
        balance_margin: the paper's balancing constraint with margin m (a number of inputs' worth of gate mass),
            or ``None`` for none. Settable later, e.g. ``layer.balance_margin = None`` for the fine-tuning phase.
        backend: passed to ``topk_gating`` and ``grouped_linear`` (sparse mode).
        renormalize: sparse mode only: divide the k kept gate values by their sum (the default), or keep them as
            the softmax gives them (Switch Transformers' top-1). With ``top_k=1`` renormalised weights are
            identically 1, so the gate gets no gradient from the output; unrenormalised ones give it one.

    Parameters: ``expert_weight [E, out, in]``, ``expert_bias [E, out]`` and ``gate``, an ``nn.Sequential(Linear(in,
    gate_hidden), activation, Linear(gate_hidden, E))`` mapping x to the ``[B, E]`` gate logits (the router row of
    expert e is ``gate[-1].weight[e]``, ``gate[-1].bias[e]``). Without balancing,
    ``z = sum_i softmax(gate(x))_i * act(x @ expert_weight[i].T + expert_bias[i])`` (over the top k in sparse mode).

    Balancing (Eigen et al.'s constraint): the buffer ``balance_totals [E]`` (float32, on the module's device)
    holds G_i, the gate mass each expert has received, summed over the training inputs seen since
    ``reset_balance()``. In a forward in training mode with ``balance_margin`` set, every expert with
    ``G_i - mean(G) > m`` (decided from the totals before this batch) gets gate value 0 for the whole batch and
    the gate is renormalised over the others (its logit is set to -inf before the softmax); then the batch's gate
    values, as applied (the renormalised top-k weights in sparse mode), are added to G. At least one expert is
    always at or below the mean, so some expert is always left. All of it stays on the device: no host sync.
    In eval mode, or with ``balance_margin=None``, the gate is used as it is and the totals are neither read nor
    updated. The totals follow ``.to(device)`` and stay float32 under ``.half()`` / ``.bfloat16()`` (float64 under
    ``.double()``).

    After each forward: ``gate_probs [B, E]`` (the gate distribution, after any balancing), ``topk_ids [B, k]``
    int32 and ``topk_weights [B, k]`` in sparse mode (``None`` in dense mode).

    Example (the paper's first layer on jittered MNIST)::

        layer = MixtureLayer(36 * 36, 100, num_experts=4, balance_margin=100.0)
        z = layer(images)            # [B, 1, 36, 36] -> [B, 100]
        layer.gate_probs.argmax(1)   # which expert each input went to
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        gate_hidden: int = 50,
        top_k: int | None = None,
        activation: str = "relu",
        balance_margin: float | None = None,
        *,
        backend: str = "auto",
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_features", in_features),
            ("out_features", out_features),
            ("num_experts", num_experts),
            ("gate_hidden", gate_hidden),
        ):
            _checks.integer(name, value, low=1)
        if top_k is not None:
            _checks.integer("top_k", top_k, low=1, high=num_experts)
        _checks.choice("activation", activation, LINEAR_ACTIVATIONS)
        if not isinstance(renormalize, bool):
            raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
        self.renormalize = renormalize
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.top_k, self.activation, self.backend = top_k, activation, backend
        self.balance_margin = balance_margin
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features))
        self.gate = nn.Sequential(
            nn.Linear(in_features, gate_hidden),
            _ACTIVATION_MODULES[activation](),
            nn.Linear(gate_hidden, num_experts),
        )
        self.register_buffer("balance_totals", torch.zeros(num_experts))
        self.gate_probs: torch.Tensor | None = None
        self.topk_ids: torch.Tensor | None = None
        self.topk_weights: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def balance_margin(self) -> float | None:
        return self._balance_margin

    @balance_margin.setter
    def balance_margin(self, value: float | None) -> None:
        self._balance_margin = _margin(value)

    def reset_parameters(self) -> None:
        """The experts as ``nn.Linear`` initialises its weights, each on its own; the gate's own Linear layers."""
        _uniform_(self.expert_weight, self.in_features)
        _uniform_(self.expert_bias, self.in_features)
        for module in self.gate:
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.balance_totals.dtype in (torch.float16, torch.bfloat16):
            # Sums over a whole training run need more than 8 or 11 bits: .half() / .bfloat16() leave them float32.
            self.balance_totals = self.balance_totals.float()
        return module

    def reset_balance(self) -> None:
        """Clear the running totals G of the balancing constraint."""
        self.balance_totals.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("x", x, floating=True)
        if x.dim() < 2:
            raise ValueError(f"x must be [B, in_features={self.in_features}] (or [B, ...]), got shape {list(x.shape)}")
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"x must have in_features={self.in_features} values per input (after flattening from dim 1), "
                f"got shape {list(x.shape)}"
            )
        logits = self.gate(flat)
        balancing = self.training and self.balance_margin is not None
        if balancing:
            totals = self.balance_totals
            logits = logits.masked_fill(totals - totals.mean() > self.balance_margin, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=reference.compute_dtype(flat))
        if self.top_k is None:
            out, assigned = self._dense(flat, probs), probs
            self.topk_ids = self.topk_weights = None
        else:
            weights, ids = topk_gating(logits, self.top_k, renormalize=self.renormalize, backend=self.backend)
            experts = (self.expert_weight, self.expert_bias)
            out = grouped_linear(flat, *experts, weights, ids, activation=self.activation, backend=self.backend)
            assigned = torch.zeros_like(probs).scatter(1, ids.long(), weights.to(probs.dtype))
            self.topk_ids, self.topk_weights = ids, weights
        if balancing:
            with torch.no_grad():
                self.balance_totals.add_(assigned.detach().sum(0).to(self.balance_totals.dtype))
        self.gate_probs = probs
        return out

    def _dense(self, flat: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        E, n_out = self.num_experts, self.out_features
        # All E experts as one [B, in] x [in, E*out] matmul (a view of expert_weight: no copy), bias fused.
        pre = nn.functional.linear(flat, self.expert_weight.reshape(E * n_out, -1), self.expert_bias.reshape(-1))
        experts = reference.linear_activation(self.activation, pre).view(-1, E, n_out)
        return torch.einsum("be,beo->bo", probs.to(experts.dtype), experts)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation!r}, balance_margin={self.balance_margin}"
            + ("" if self.renormalize else ", renormalize=False")
        )


def _layer_spec(layers: object) -> list[tuple[int, int]]:
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a list of (num_experts, out_features) pairs, got {type(layers).__name__}")
    if not layers:
        raise ValueError("layers must hold at least one (num_experts, out_features) pair, got an empty list")
    spec = []
    for i, pair in enumerate(layers):
        if isinstance(pair, str | bytes) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"layers[{i}] must be a (num_experts, out_features) pair, got {pair!r}")
        experts = _checks.integer(f"layers[{i}] num_experts", pair[0], low=1)
        spec.append((experts, _checks.integer(f"layers[{i}] out_features", pair[1], low=1)))
    return spec


class DeepMoE(nn.Module):
    """Stacked mixture layers and a linear classifier: ``z1 = layer1(x), z2 = layer2(z1), ...,
    logits = Linear(z_last)``; the gates of layer l+1 read layer l's output.

    Args:
        in_features: input width (inputs are flattened from dim 1).
        layers: ``[(num_experts, out_features), ...]``, one pair per mixture layer (at least one).
        num_classes: outputs of the classifier.
        gate_hidden, top_k, balance_margin, activation, backend, renormalize: of every ``MixtureLayer``
            (``top_k`` must be in ``[1, E]`` of every layer).

    ``model.gate_probs`` is the list of every layer's last ``[B, E]`` gate distribution; ``model.balance_margin``
    reads the layers' margin and sets all of them (``model.balance_margin = None``: the paper's fine-tuning
    phase); ``model.reset_balance()`` clears every layer's totals.

    Example (the paper's jittered-MNIST model)::

        model = DeepMoE(36 * 36, [(4, 100), (4, 100)], 10, balance_margin=100.0)
        logits = model(images)       # [B, 1, 36, 36] -> [B, 10]
        where, what = (g.argmax(1) for g in model.gate_probs)
    """

    def __init__(
        self,
        in_features: int,
        layers: Sequence[tuple[int, int]],
        num_classes: int,
        gate_hidden: int = 50,
        top_k: int | None = None,
        balance_margin: float | None = None,
        *,
        activation: str = "relu",
        backend: str = "auto",
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        _checks.integer("in_features", in_features, low=1)
        _checks.integer("num_classes", num_classes, low=1)
        spec = _layer_spec(layers)
        if top_k is not None:
            _checks.integer("top_k", top_k, low=1)
            fewest = min(e for e, _ in spec)
            if top_k > fewest:
                raise ValueError(f"top_k must be in [1, E] for every layer; a layer has E={fewest}, got top_k={top_k}")
        widths = [in_features] + [out for _, out in spec]
        self.layers = nn.ModuleList(
            MixtureLayer(
                widths[i],
                out,
                experts,
                gate_hidden,
                top_k,
                activation,
                balance_margin,
                backend=backend,
                renormalize=renormalize,
            )
            for i, (experts, out) in enumerate(spec)
        )
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x
        for layer in self.layers:
            z = layer(z)
        return self.classifier(z)

    @property
    def gate_probs(self) -> list[torch.Tensor | None]:
        return [layer.gate_probs for layer in self.layers]

    @property
    def balance_margin(self) -> float | None:
        return self.layers[0].balance_margin

    @balance_margin.setter
    def balance_margin(self, value: float | None) -> None:
        margin = _margin(value)
        for layer in self.layers:
            layer.balance_margin = margin

    def reset_balance(self) -> None:
        for layer in self.layers:
            layer.reset_balance()
