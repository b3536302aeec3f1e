"""The universal (expert-agnostic) gate of Kang, Hong & Maul: one MLP on statistics of an expert's logits, shared
by every expert, so it applies to experts it never saw; the expert with the highest "mine" score wins."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.combine import STATISTICS, logit_statistics
from netmerge_fast.nn.gate_files import check_config, load_gates, save_gates
from netmerge_fast.nn.pan import _mlp

PRETRAINED_FILE = "universal_gate.safetensors"

# Features derived from the raw statistics and the expert's class count C, so that one gate reads 2-class and
# 10-class experts on the same scale (raw mean/std/max of logits shift with C, and a gate trained on 5-class
# experts then misreads 2-class ones). Each: (raw statistics it needs, function of those and C).
DERIVED_FEATURES = {
    # max softmax probability rescaled from [1/C, 1] to [0, 1]: 0 = uniform, 1 = certain (1 when C = 1)
    "max_prob_norm": (
        ("max_prob",),
        lambda s, c: torch.where(c > 1, (s["max_prob"] - 1 / c) / (1 - 1 / c).clamp_min(1e-12), 1.0),
    ),
    # softmax entropy over log C, in [0, 1] (0 when C = 1)
    "entropy_norm": (("entropy",), lambda s, c: torch.where(c > 1, s["entropy"] / c.log().clamp_min(1e-12), 0.0)),
    # how far the top logit stands above the typical one (C-independent in scale, unlike max or mean)
    "max_minus_median": (("max", "median"), lambda s, c: s["max"] - s["median"]),
}
_BASES = (*STATISTICS, *DERIVED_FEATURES)
# Data-free calibration: "z_<feature>" is the feature standardised against the same expert's values on reference
# inputs from no one's domain (Gaussian noise by default): (value - mean_ref) / std_ref. A per-expert affine map of
# the logits (another temperature, another offset) leaves z_max and z_margin unchanged, so a gate trained on one
# pair of experts reads another pair's scale.
CALIBRATED_FEATURES = tuple(f"z_{name}" for name in _BASES)
FEATURES = (*_BASES, *CALIBRATED_FEATURES)
# The class-count-normalised features: the default of UniversalGate(), and the first bundled gate's.
NORMALISED_FEATURES = ("max_prob_norm", "entropy_norm", "margin", "max_minus_median")
DEFAULT_FEATURES = NORMALISED_FEATURES
# The bundled gate's: the normalised features plus the expert's max logit and margin calibrated on Gaussian noise.
CALIBRATED_GATE_FEATURES = (*NORMALISED_FEATURES, "z_max", "z_margin")
FIRST_PRETRAINED_FILE = "universal_gate_v1.safetensors"
_MIN_STD = 1e-6  # floor of a reference std: a feature constant on the reference inputs gives finite z-scores


def calibration_bases(stats: Sequence[str]) -> tuple[str, ...]:
    """The features that ``stats``' ``z_`` names standardise, each once, in first-use order: the layout of a
    calibration tensor's second dimension."""
    return tuple(dict.fromkeys(s[2:] for s in stats if s in CALIBRATED_FEATURES))


def expert_features(
    logits, class_counts=None, stats: Sequence[str] = DEFAULT_FEATURES, calibration: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, E, S]`` float32: the features named in ``stats`` for every expert's logits (a list of ``[B, C_i]`` or
    a packed tensor with ``class_counts``, as ``logit_statistics``). ``calibration`` ``[E, Z, 2]`` (mean and std
    of each of ``calibration_bases(stats)`` on the expert's reference inputs, from ``calibration_moments``) is
    needed when ``stats`` holds ``z_`` names. Differentiable; no host syncs."""
    bases = calibration_bases(stats)
    if bases:
        if calibration is None:
            raise ValueError(f"stats {tuple(stats)} hold calibrated (z_) features: calibration is required")
        _checks.tensor("calibration", calibration, dim=3, floating=True)
    wanted = [s[2:] if s in CALIBRATED_FEATURES else s for s in stats]
    needed = [r for s in wanted for r in (DERIVED_FEATURES[s][0] if s in DERIVED_FEATURES else (s,))]
    raw_names = tuple(dict.fromkeys(needed))
    raw = logit_statistics(logits, class_counts, stats=raw_names)
    if bases and tuple(calibration.shape) != (raw.shape[1], len(bases), 2):
        raise ValueError(f"calibration must be [E, {len(bases)}, 2] = [{raw.shape[1]}, {len(bases)}, 2] "
                         f"(mean, std of {bases}), got {list(calibration.shape)}")  # fmt: skip
    named = dict(zip(raw_names, raw.unbind(-1), strict=True))
    if any(s in DERIVED_FEATURES for s in wanted):
        if class_counts is None:  # a list of [B, C_i] tensors (logit_statistics has checked it)
            class_counts = [t.shape[-1] for t in logits]
        counts = torch.as_tensor(class_counts, device=raw.device).to(raw.dtype)  # [E], broadcasts over B
        for s in dict.fromkeys(wanted):
            if s in DERIVED_FEATURES:
                named[s] = DERIVED_FEATURES[s][1](named, counts)
    columns = []
    for s, w in zip(stats, wanted, strict=True):
        if s in CALIBRATED_FEATURES:
            k = bases.index(w)
            ref = calibration.to(raw.dtype)
            columns.append((named[w] - ref[:, k, 0]) / ref[:, k, 1].clamp_min(_MIN_STD))
        else:
            columns.append(named[w])
    return torch.stack(columns, -1)


def calibration_moments(logits, class_counts=None, stats: Sequence[str] = DEFAULT_FEATURES) -> torch.Tensor:
    """``[E, Z, 2]`` float32: mean and (unbiased) std over the rows of each expert's reference logits of every
    feature that ``stats``' ``z_`` names standardise (``calibration_bases(stats)``; Z may be 0). The rows should be
    the experts' outputs on inputs from no one's domain (``HeterogeneousMoE.calibrate`` uses Gaussian noise). NaN
    reference values (e.g. the std of a 1-class expert) are left out of that expert's moments."""
    bases = calibration_bases(stats)
    values = expert_features(logits, class_counts, bases or ("max",)).detach()[..., : len(bases)]  # [N, E, Z]
    if values.shape[0] < 2:
        raise ValueError(f"calibration needs at least 2 reference rows, got {values.shape[0]}")
    valid = ~values.isnan()
    n = valid.sum(0).clamp_min(1)
    mean = values.nan_to_num().sum(0) / n
    var = ((values - mean).nan_to_num() ** 2).sum(0) / (n - 1).clamp_min(1)
    return torch.stack([mean, var.sqrt()], -1)


class UniversalGate(nn.Module):
    """MLP ``len(stats) -> 80 -> 50 -> 20 -> 2`` (ReLU) on per-expert features of its logits.

    Args:
        stats: the gate's input features, in order: names from ``netmerge_fast.combine.STATISTICS`` (raw
            statistics computed by ``logit_statistics``); from ``DERIVED_FEATURES``, which also use the
            expert's class count C: ``"max_prob_norm"`` ((max_prob - 1/C) / (1 - 1/C)), ``"entropy_norm"``
            (entropy / log C), ``"max_minus_median"``; or ``"z_"`` + either of those (``CALIBRATED_FEATURES``):
            the feature standardised against the same expert's values on reference inputs from no one's domain
            (data-free calibration, see ``HeterogeneousMoE.calibrate``). The default, ``NORMALISED_FEATURES`` =
            ``("max_prob_norm", "entropy_norm", "margin", "max_minus_median")``, is on the same scale for any C,
            so a gate trained on 5-class experts transfers to 2- or 10-class ones; the paper's ``("mean", "std",
            "max")`` (the follow-up's ``[mean, std, max, min]``) is not (raw logit statistics shift with C).
        hidden: hidden layer widths.
        standardise: the MLP reads the features standardised by per-feature ``input_mean`` / ``input_std``
            buffers, which ``GatingTrainer.fit`` sets from its training rows (calibrated z-scores of unseen
            experts can be far larger than the other features; unscaled, they dominate SGD's first steps).

    ``forward(features [..., S]) -> [..., 2]`` logits (e.g. ``[B, E, S] -> [B, E, 2]``; column 1: "mine").
    ``statistics(logits, class_counts, calibration)`` computes the ``[B, E, S]`` features (differentiable; see
    ``expert_features``); ``scores(logits, class_counts, calibration)`` takes the experts' logits and returns the
    ``[B, E]`` log-odds of "mine", the ``gate`` for ``combine_logits(method="gate")``. ``calibration``
    (``[E, Z, 2]``, from ``calibration_moments``) is needed only when ``stats`` holds ``z_`` names
    (``needs_calibration``).

    Example::

        gate = UniversalGate.pretrained()                       # bundled, trained on the project's experts
        winner = gate.scores([logits_a, logits_b]).argmax(1)
    """

    def __init__(
        self,
        stats: Sequence[str] = DEFAULT_FEATURES,
        hidden: Sequence[int] = (80, 50, 20),
        *,
        standardise: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(stats, str) or not isinstance(stats, Sequence) or not stats:
            raise TypeError(f"stats must be a non-empty sequence of statistic names, got {stats!r}")
        self.stats = tuple(_checks.choice("stats", s, FEATURES) for s in stats)
        self.hidden = tuple(_checks.integer(f"hidden[{i}]", h, low=1) for i, h in enumerate(hidden))
        self.net = _mlp(len(self.stats), self.hidden, 2)
        self.standardise = _checks.boolean("standardise", standardise)
        if self.standardise:
            self.register_buffer("input_mean", torch.zeros(len(self.stats)))
            self.register_buffer("input_std", torch.ones(len(self.stats)))

    def fit_standardisation(self, features: torch.Tensor) -> None:
        """Set ``input_mean`` / ``input_std`` from training features ``[..., S]`` (NaN rows left out)."""
        if not self.standardise:
            raise ValueError("fit_standardisation needs a gate built with standardise=True")
        rows = features.detach().float().reshape(-1, len(self.stats))
        rows = rows[~rows.isnan().any(1)]
        if len(rows) < 2:
            raise ValueError(f"features must hold at least 2 rows without NaN, got {len(rows)}")
        self.input_mean.copy_(rows.mean(0))
        self.input_std.copy_(rows.std(0).clamp_min(_MIN_STD))

    @property
    def needs_calibration(self) -> bool:
        return bool(calibration_bases(self.stats))

    def forward(self, statistics: torch.Tensor) -> torch.Tensor:
        if statistics.dim() < 1 or statistics.shape[-1] != len(self.stats):
            shape = list(statistics.shape)
            raise ValueError(f"statistics must be [..., {len(self.stats)}] ({self.stats}), got {shape}")
        if self.standardise:
            return self.net((statistics.float() - self.input_mean) / self.input_std)
        return self.net(statistics.float())

    def statistics(self, logits, class_counts=None, calibration: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, E, S]``: the features named in ``stats`` for every expert's logits (``expert_features``)."""
        return expert_features(logits, class_counts, self.stats, calibration)

    def scores(self, logits, class_counts=None, calibration: torch.Tensor | None = None) -> torch.Tensor:
        out = self(self.statistics(logits, class_counts, calibration))
        return out[..., 1] - out[..., 0]

    def config(self) -> dict:
        config = {"kind": "universal", "stats": list(self.stats), "hidden": list(self.hidden)}
        return config | ({"standardise": True} if self.standardise else {})

    def save(self, path: str | os.PathLike) -> None:
        save_gates(path, self.state_dict(), self.config())

    @classmethod
    def load(cls, path: str | os.PathLike, stats: Sequence[str] | None = None) -> UniversalGate:
        """A saved gate; with ``stats``, refuse a gate trained on other statistics (``ValueError``)."""
        state, config = load_gates(path)
        check_config(path, config, {"kind": "universal"} | ({"stats": list(stats)} if stats is not None else {}))
        gate = cls(config["stats"], config["hidden"], standardise=config.get("standardise", False))
        gate.load_state_dict(state)
        return gate

    @classmethod
    def pretrained(cls, stats: Sequence[str] | None = None, *, version: int = 2) -> UniversalGate:
        """The gate bundled with the package (``python -m netmerge_fast.demo.train_universal_gate`` rebuilds it,
        byte for byte): version 2 on ``CALIBRATED_GATE_FEATURES`` (its experts need ``calibrate``, which
        ``HeterogeneousMoE`` does by itself), version 1 the first bundled gate, on ``NORMALISED_FEATURES``."""
        names = {1: FIRST_PRETRAINED_FILE, 2: PRETRAINED_FILE}
        if version not in names:
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        with resources.as_file(resources.files("netmerge_fast.nn") / names[version]) as path:
            return cls.load(path, stats)
