"""HeterogeneousMoE: several pre-trained classifiers with different label sets merged into one classifier over the
union of their labels, without a joint training set (Kang, Hong & Maul 2020)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.combine import METHODS, combine_logits
from netmerge_fast.nn.augmentations import resolve_augmentation
from netmerge_fast.nn.gate_files import check_config, load_gates, save_gates
from netmerge_fast.nn.pan import PAN
from netmerge_fast.nn.universal_gate import (
    FEATURES,
    UniversalGate,
    calibration_bases,
    calibration_moments,
    expert_features,
)

# "gate" is left out: inside the module the gate is a PAN, the universal gate or the oracle.
DATA_FREE_COMBINERS = tuple(m for m in METHODS if m != "gate")
PAN_COMBINERS = ("pan_logits", "pan_features", "pan_statistics")
GATED_COMBINERS = (*PAN_COMBINERS, "universal")
COMBINERS = (*DATA_FREE_COMBINERS, *GATED_COMBINERS, "oracle")
AGGREGATES = ("mean", "vote")
# The seed's "agnostic" PAN: statistics [mean, std, max] of the expert's logits into an MLP 3-80-50-20-2.
SEED_PAN_STATS = ("mean", "std", "max")
STATISTICS_PAN_HIDDEN = (80, 50, 20)
CALIBRATION_COUNT = 2048


class HeterogeneousMoE(nn.Module):
    """E >= 2 pre-trained experts, expert i a classifier over its own ``class_counts[i]`` classes; the output is
    logits ``[B, sum(class_counts)]`` over the union, expert 0's classes first, then expert 1's, and so on.

    Args:
        experts: the pre-trained classifiers, all on one device; each maps a batch ``x`` to logits
            ``[B, C_i]``, or to a tuple ``(logits, features)`` (features ``[B, ...]``, flattened, feed
            ``combiner="pan_features"``).
        class_counts: C_i per expert.
        combiner: how the experts' answers become one:

            - every ``combine_logits`` method but ``"gate"`` (``"naive"``, ``"std"``, ``"range"``, ...): data-free.
            - ``"pan_logits"`` / ``"pan_features"`` / ``"pan_statistics"``: one ``PAN`` per expert on its logits
              / its features / statistics of its logits (``pan_stats``; the seed's "agnostic" PAN, MLP
              3-80-50-20-2); exactly one claim selects that expert, none or several fall back to the
              concatenation. Train them with ``netmerge_fast.training.GatingTrainer`` (or ``load_gates``).
            - ``"universal"``: one ``UniversalGate`` shared by every expert; the highest "mine" score wins. By
              default the gate bundled with the package, so it works with no data at all.
            - ``"oracle"``: the true domain (``forward(x, domain=...)``) selects the expert; an upper bound for
              evaluation only.

        augmentations: multi-pass test-time augmentation: the plain input plus one pass per entry (a name from
            ``netmerge_fast.nn.augmentations.AUGMENTATIONS``: the seed's ``"gaussian"``, ``"poisson"``,
            ``"horizontal_flip"``, ``"vertical_flip"``, ``"random_resized_crop"``, ``"sharpen"``, the project's
            ``"rotate180"``, ``"random_square_crop"``; or a callable batch -> batch, e.g. one of the seed's
            ``SEED_CONFIGURATIONS``' lists); every pass is combined by ``combiner`` and the passes are aggregated.
        aggregate: ``"mean"`` of the passes' combined logits, or ``"vote"``, the seed's majority vote
            (``torch.mode`` of the passes' answers): the output holds each class's number of per-pass argmax
            wins, so its argmax is the most frequent answer, a tie going to the lowest class index (as
            ``torch.mode`` on CPU).
        feature_modules: for ``"pan_features"`` with experts that return plain logits: one submodule per expert
            whose output (captured by a forward hook) is the feature.
        feature_dims: feature widths for ``"pan_features"`` (default: found by the trainer from the features).
        gate: a ``UniversalGate`` for ``"universal"`` (default ``UniversalGate.pretrained()``).
        pan_stats: the features of ``"pan_statistics"``' PANs (names as ``UniversalGate``'s ``stats``; default the
            seed's ``("mean", "std", "max")``).

    Every expert runs once per forward: the augmented passes are stacked into one batch. No host syncs on the
    path (except the oracle's range check of ``domain``). A gate on calibrated (``z_``) features needs each
    expert's reference moments (``calibrate``): the first forward computes them from Gaussian noise shaped like
    its input rows if ``calibrate`` was not called.

    Example::

        moe = HeterogeneousMoE([net_0_to_4, net_5_to_9], [5, 5], combiner="universal")
        predictions = moe.eval()(x).argmax(1)   # 0..9
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        class_counts: Sequence[int],
        combiner: str = "naive",
        *,
        augmentations: Sequence[object] = (),
        aggregate: str = "mean",
        feature_modules: Sequence[nn.Module] | None = None,
        feature_dims: Sequence[int] | None = None,
        gate: UniversalGate | None = None,
        pan_stats: Sequence[str] = SEED_PAN_STATS,
    ) -> None:
        super().__init__()
        if isinstance(experts, nn.Module) or not isinstance(experts, Sequence):
            raise TypeError(f"experts must be a sequence of nn.Module, got {type(experts).__name__}")
        for i, e in enumerate(experts):
            if not isinstance(e, nn.Module):
                raise TypeError(f"experts[{i}] must be an nn.Module, got {type(e).__name__}")
        if len(experts) < 2:
            raise ValueError(f"experts must hold at least 2 experts, got {len(experts)}")
        if isinstance(class_counts, str) or not isinstance(class_counts, Sequence):
            raise TypeError(f"class_counts must be a sequence of ints, got {type(class_counts).__name__}")
        if len(class_counts) != len(experts):
            raise ValueError(f"class_counts has {len(class_counts)} entries but there are {len(experts)} experts")
        self.experts = nn.ModuleList(experts)
        self.class_counts = [_checks.integer(f"class_counts[{i}]", c, low=1) for i, c in enumerate(class_counts)]
        self.combiner = _checks.choice("combiner", combiner, COMBINERS)
        if isinstance(augmentations, str) or not isinstance(augmentations, Sequence):
            raise TypeError(f"augmentations must be a sequence of names or callables, got {augmentations!r}")
        self.augmentations = [resolve_augmentation(f"augmentations[{i}]", a) for i, a in enumerate(augmentations)]
        self.aggregate = _checks.choice("aggregate", aggregate, AGGREGATES)
        device = _common_device(self.experts)

        self._captured: list[torch.Tensor | None] = [None] * len(experts)
        self._hooks = []
        if feature_modules is not None:
            if len(feature_modules) != len(experts):
                raise ValueError(f"feature_modules has {len(feature_modules)} entries but there are {len(experts)}")
            for i, m in enumerate(feature_modules):
                if not isinstance(m, nn.Module):
                    raise TypeError(f"feature_modules[{i}] must be an nn.Module, got {type(m).__name__}")
                self._hooks.append(m.register_forward_hook(self._capture_hook(i)))

        self.pans: nn.ModuleList | None = None
        self.gate: UniversalGate | None = None
        if isinstance(pan_stats, str) or not isinstance(pan_stats, Sequence) or not pan_stats:
            raise TypeError(f"pan_stats must be a non-empty sequence of feature names, got {pan_stats!r}")
        self.pan_stats = tuple(_checks.choice("pan_stats", s, FEATURES) for s in pan_stats)
        if self.pan_stats != SEED_PAN_STATS and combiner != "pan_statistics":
            raise ValueError(f"pan_stats is only used with combiner='pan_statistics', got combiner={combiner!r}")
        # [E, Z, 2] reference moments of the calibrated features (see calibrate); None until computed
        self.register_buffer("calibration", None, persistent=False)
        self._calibration_bases: tuple[str, ...] = ()
        if combiner == "pan_logits":
            self.pans = nn.ModuleList(PAN(c) for c in self.class_counts).to(device)
        elif combiner == "pan_statistics":
            self.build_pans([len(self.pan_stats)] * self.num_experts, STATISTICS_PAN_HIDDEN)
        elif combiner == "pan_features" and feature_dims is not None:
            if len(feature_dims) != len(experts):
                raise ValueError(f"feature_dims has {len(feature_dims)} entries but there are {len(experts)} experts")
            self.build_pans([_checks.integer(f"feature_dims[{i}]", d, low=1) for i, d in enumerate(feature_dims)])
        elif combiner == "universal":
            if gate is not None and not isinstance(gate, UniversalGate):
                raise TypeError(f"gate must be a UniversalGate, got {type(gate).__name__}")
            self.gate = (gate if gate is not None else UniversalGate.pretrained()).to(device)
        if gate is not None and combiner != "universal":
            raise ValueError(f"gate is only used with combiner='universal', got combiner={combiner!r}")

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def uses_features(self) -> bool:
        return self.combiner == "pan_features"

    def build_pans(self, in_features: Sequence[int], hidden: Sequence[int] = (80, 60)) -> None:
        """Fresh PANs with these input widths (the trainer calls this for ``pan_features``)."""
        device = _common_device(self.experts)
        self.pans = nn.ModuleList(PAN(d, hidden) for d in in_features).to(device)

    @property
    def gate_features(self) -> tuple[str, ...]:
        """The features the gates read: the universal gate's ``stats``, the statistics PANs' ``pan_stats``."""
        if self.combiner == "universal":
            return self.gate.stats
        return self.pan_stats if self.combiner == "pan_statistics" else ()

    @property
    def needs_calibration(self) -> bool:
        return bool(calibration_bases(self.gate_features))

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None and self._calibration_bases == calibration_bases(self.gate_features)

    @torch.no_grad()
    def calibrate(
        self,
        input_shape: Sequence[int] | None = None,
        *,
        inputs: torch.Tensor | None = None,
        count: int = CALIBRATION_COUNT,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> HeterogeneousMoE:
        """Data-free calibration: each expert's mean and std of every feature the gate standardises (its ``z_``
        features), measured on reference inputs from no one's domain, kept in the buffer ``calibration``
        ``[E, Z, 2]``. By default ``count`` standard-normal inputs of ``input_shape`` (one row's shape, e.g.
        ``(1, 28, 28)``), drawn on the experts' device from ``seed``: the scale of standardised inputs. Or pass
        ``inputs`` ``[N, ...]`` of your own (synthetic) reference inputs; they must not come from the experts'
        domains for the merge to stay data-free. The experts run in eval mode (restored after), in chunks."""
        device = _common_device(self.experts)
        if inputs is None:
            if input_shape is None:
                raise ValueError("calibrate needs input_shape (the shape of one input row) or inputs")
            shape = [_checks.integer(f"input_shape[{i}]", d, low=1) for i, d in enumerate(input_shape)]
            _checks.integer("count", count, low=2)
            gen = torch.Generator(device=device).manual_seed(_checks.integer("seed", seed, low=0))
            inputs = torch.randn(count, *shape, generator=gen, device=device, dtype=dtype)
        else:
            _checks.tensor("inputs", inputs, floating=True)
            if inputs.shape[0] < 2:
                raise ValueError(f"inputs must hold at least 2 reference rows, got {inputs.shape[0]}")
        modes = [e.training for e in self.experts]
        self.experts.eval()
        try:
            chunks = [self.expert_outputs(inputs[s : s + 1024].to(device))[0] for s in range(0, len(inputs), 1024)]
        finally:
            for e, mode in zip(self.experts, modes, strict=True):
                e.train(mode)
        logits = [torch.cat([c[i] for c in chunks]) for i in range(self.num_experts)]
        self.calibration = calibration_moments(logits, self.class_counts, self.gate_features).to(device)
        self._calibration_bases = calibration_bases(self.gate_features)
        return self

    def _ensure_calibrated(self, x: torch.Tensor) -> None:
        if self.needs_calibration and not self.calibrated:
            self.calibrate(x.shape[1:], dtype=x.dtype if x.is_floating_point() else torch.float32)

    def _capture_hook(self, index: int):
        def hook(_module, _inputs, output):
            self._captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def expert_outputs(
        self, x: torch.Tensor, features: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every expert once on ``x``: their logits ``[B, C_i]`` and, with ``features``, features ``[B, F_i]``."""
        logits, feats = [], []
        for i, expert in enumerate(self.experts):
            self._captured[i] = None
            out = expert(x)
            feature = None
            if isinstance(out, tuple):
                if len(out) != 2:
                    raise ValueError(f"experts[{i}] returned a tuple of {len(out)}; expected (logits, features)")
                out, feature = out
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != self.class_counts[i]:
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"experts[{i}] must return logits [B, class_counts[{i}]] = [B, {self.class_counts[i]}], got {shape}"
                )
            logits.append(out)
            if features:
                feature = self._captured[i] if feature is None else feature
                if feature is None:
                    raise ValueError(
                        f"combiner='pan_features' needs features: experts[{i}] must return (logits, features) "
                        "or HeterogeneousMoE needs feature_modules"
                    )
                feats.append(feature.flatten(1))
        return logits, (feats if features else None)

    def forward(
        self, x: torch.Tensor, domain: torch.Tensor | None = None, *, return_winner: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, sum C_i]`` over the union; with ``return_winner`` also the selected expert ``[B]``
        (int64, -1 where no single expert was selected; for augmented passes, the plain pass's winner).

        ``domain`` ``[B]`` int: the true expert of each row, for ``combiner="oracle"`` only."""
        combined, winner = self.combined_passes(x, domain)
        combined = combined[0] if len(combined) == 1 else aggregate_passes(combined, self.aggregate)
        return (combined, winner[0]) if return_winner else combined

    def combined_passes(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pass (the plain input, then one per augmentation) combined on its own, before aggregation:
        ``(combined [P, B, sum C_i], winner [P, B])``; the experts run once, on all passes stacked."""
        _checks.tensor("x", x)
        if (domain is not None) != (self.combiner == "oracle"):
            raise ValueError("domain is required with combiner='oracle' and only used there")
        self._ensure_calibrated(x)
        passes = 1 + len(self.augmentations)
        if passes > 1:
            x = torch.cat([x, *(aug(x) for aug in self.augmentations)])
        logits, feats = self.expert_outputs(x, features=self.uses_features)
        combined, winner = self.combine(logits, feats, domain.repeat(passes) if domain is not None else None)
        return combined.view(passes, -1, combined.shape[-1]), winner.view(passes, -1)

    def combine(
        self, logits: list[torch.Tensor], features: list[torch.Tensor] | None = None, domain: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The combiner on precomputed expert outputs: ``(combined [B, sum C_i], winner [B])``."""
        counts = self.class_counts
        if self.combiner in DATA_FREE_COMBINERS:
            return combine_logits(logits, counts, method=self.combiner, return_winner=True)
        return combine_logits(logits, counts, method="gate", gate=self.gate_output(logits, features, domain),
                              return_winner=True)  # fmt: skip

    def gate_output(
        self, logits: list[torch.Tensor], features: list[torch.Tensor] | None = None, domain: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, E]``: the PANs' boolean claims, the universal gate's float scores or the oracle's one-hot. Gates
        on calibrated features need ``calibrate`` first (``forward`` does it)."""
        if self.combiner == "oracle":
            _checks.tensor("domain", domain, dim=1, integer=True)
            if domain.shape[0] != logits[0].shape[0]:
                raise ValueError(f"domain has {domain.shape[0]} rows but x has {logits[0].shape[0]}")
            if domain.numel() and (int(domain.min()) < 0 or int(domain.max()) >= self.num_experts):
                raise ValueError(f"domain must hold expert indices in [0, {self.num_experts - 1}]")
            return nn.functional.one_hot(domain.to(logits[0].device), self.num_experts).float()
        if self.combiner == "universal":
            return self.gate.scores(logits, self.class_counts, self._calibration_or_error())
        if self.pans is None:
            raise RuntimeError("the PANs are not built yet: train them (GatingTrainer.fit) or load_gates first")
        inputs = self.pan_inputs(logits, features)
        return torch.stack([pan.claims(v) for pan, v in zip(self.pans, inputs, strict=True)], dim=1)

    def pan_inputs(self, logits: list[torch.Tensor], features: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """What each PAN reads: the expert's logits, its features, or the ``[B, S]`` statistics of its logits."""
        if self.combiner == "pan_features":
            return features
        if self.combiner == "pan_statistics":
            stats = expert_features(logits, self.class_counts, self.pan_stats, self._calibration_or_error())
            return list(stats.unbind(1))
        return logits

    def _calibration_or_error(self) -> torch.Tensor | None:
        if not self.needs_calibration:
            return None
        if not self.calibrated:
            raise RuntimeError("the gate reads calibrated (z_) features: call calibrate(input_shape) first")
        return self.calibration

    def gate_config(self) -> dict:
        if self.combiner == "universal":
            return self.gate.config()
        if self.combiner in PAN_COMBINERS and self.pans is not None:
            config = {
                "kind": self.combiner,
                "in_features": [p.in_features for p in self.pans],
                "hidden": [list(p.hidden) for p in self.pans],
            }
            return config | ({"stats": list(self.pan_stats)} if self.combiner == "pan_statistics" else {})
        raise ValueError(f"combiner={self.combiner!r} has no trained gates to save")

    def save_gates(self, path: str | os.PathLike) -> None:
        """The trained gates (PANs or the universal gate) to a safetensors file; the experts are not saved."""
        module = self.gate if self.combiner == "universal" else self.pans
        save_gates(path, module.state_dict(), self.gate_config())

    def load_gates(self, path: str | os.PathLike) -> None:
        """Gates saved by ``save_gates``; a file for another combiner, statistics or sizes is a ``ValueError``."""
        state, config = load_gates(path)
        if self.combiner == "universal":
            check_config(path, config, self.gate.config())
            if config.get("standardise", False) != self.gate.standardise:
                found = config.get("standardise", False)
                raise ValueError(f"path {os.fspath(path)!r} holds gates for another model: standardise: file has "
                                 f"{found!r}, model needs {self.gate.standardise!r}")  # fmt: skip
            self.gate.load_state_dict(state)
            return
        if self.combiner not in PAN_COMBINERS:
            raise ValueError(f"combiner={self.combiner!r} has no gates to load")
        expected = {"kind": self.combiner}
        if self.combiner != "pan_features" or self.pans is not None:
            expected |= {"in_features": [p.in_features for p in self.pans]}
        if self.combiner == "pan_statistics":
            expected |= {"stats": list(self.pan_stats)}
        check_config(path, config, expected)
        if len(config["in_features"]) != self.num_experts:
            found = len(config["in_features"])
            raise ValueError(f"path {os.fspath(path)!r} holds {found} PANs, not {self.num_experts}")
        device = _common_device(self.experts)
        self.pans = nn.ModuleList(PAN(d, h) for d, h in zip(config["in_features"], config["hidden"], strict=True))
        self.pans.load_state_dict(state)
        self.pans.to(device)


def aggregate_passes(combined: torch.Tensor, aggregate: str = "mean") -> torch.Tensor:
    """``[P, B, C]`` combined logits of P passes -> ``[B, C]``: their ``"mean"``, or the ``"vote"`` counts (each
    class's number of per-pass argmax wins: the argmax is the mode, ties to the lowest class index)."""
    _checks.choice("aggregate", aggregate, AGGREGATES)
    if aggregate == "mean":
        return combined.mean(0)
    return nn.functional.one_hot(combined.argmax(-1), combined.shape[-1]).sum(0).to(combined.dtype)


def _common_device(experts: nn.ModuleList) -> torch.device:
    devices = []
    for i, e in enumerate(experts):
        found = {t.device for t in (*e.parameters(), *e.buffers())}
        if len(found) > 1:
            raise ValueError(f"experts[{i}] has tensors on several devices: {sorted(map(str, found))}")
        devices.append(next(iter(found)) if found else None)
    known = [(i, d) for i, d in enumerate(devices) if d is not None]
    for i, d in known[1:]:
        if d != known[0][1]:
            raise ValueError(f"experts[{i}] is on {d} but experts[{known[0][0]}] is on {known[0][1]}; "
                             "experts must share a device")  # fmt: skip
    return known[0][1] if known else torch.device("cpu")
