"""GatingTrainer: fits a HeterogeneousMoE's gates (its PANs or its universal gate) with the experts frozen."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from netmerge_fast import _checks
from netmerge_fast.nn.heterogeneous_moe import PAN_COMBINERS, HeterogeneousMoE
from netmerge_fast.training.synthetic_negatives import NEGATIVE_KINDS, synthesise_negatives

_CHUNK = 1024  # rows per expert call when collecting outputs from a tensor
_TRAINABLE = (*PAN_COMBINERS, "universal")
_REFRESH_S = 0.25  # a terminal's progress bar redraws at most 4 times a second


@dataclass
class GateEvaluation:
    """``gate_accuracy``: fraction of rows whose selected expert is their owner; ``confusion`` ``[E, E + 1]``
    int64: row = owner, column = the expert selected, last column = no single expert (fallback to the
    concatenation); ``accuracy``: classification accuracy over the union of classes (when targets are given)."""

    gate_accuracy: float
    confusion: torch.Tensor
    accuracy: float | None = None


@dataclass
class _Collected:
    logits: list[torch.Tensor]
    features: list[torch.Tensor] | None
    owner: torch.Tensor | None
    targets: torch.Tensor | None = None
    row_shape: list[int] = field(default_factory=list)  # the shape of one input row (for calibration)


class GatingTrainer:
    """Trains the gates of ``moe`` (``combiner`` ``"pan_logits"``, ``"pan_features"``, ``"pan_statistics"`` or
    ``"universal"``).

    The experts are frozen: their outputs are computed once (eval mode, no grad) and the small gates train on
    them. Each gate starts from fresh weights drawn from ``seed``; a fixed seed gives the same gates run to run.

    Args:
        moe: the model whose gates to fit (in place).
        seed: seeds initialisation, the validation split and the batch order.
        lr, momentum: SGD, as the seed repository (0.01, 0.9).
        batch_size: gate training batch (the seed's PANs: 512, 10 epochs, the last epoch kept, unweighted loss;
            the batch, the early stopping and ``balance`` here are the project's).
        val_fraction: held out for early stopping: the weights with the lowest validation loss are kept, and
            training stops after ``patience`` epochs without improvement.
        balance: weight "mine" and "not mine" equally in the loss (with E experts only 1/E of the rows are a
            gate's own; the seed had E = 2, where this changes little).
        progress: report progress per gate on stderr: on a terminal a tqdm bar redrawn at most 4 times a
            second; otherwise (a log file, CI) one line per epoch.

    Example::

        moe = HeterogeneousMoE(experts, [5, 5], combiner="pan_logits")
        trainer = GatingTrainer(moe, seed=0).fit(x_train, owner_train, epochs=30)
        report = trainer.evaluate(x_test, owner_test)     # .gate_accuracy, .confusion
        trainer.save("pans.safetensors")
    """

    def __init__(
        self,
        moe: HeterogeneousMoE,
        seed: int = 0,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        patience: int = 5,
        balance: bool = True,
        progress: bool = True,
    ) -> None:
        if not isinstance(moe, HeterogeneousMoE):
            raise TypeError(f"moe must be a HeterogeneousMoE, got {type(moe).__name__}")
        self.moe = moe
        self.seed = _checks.integer("seed", seed, low=0)
        self.lr = _checks.finite_real("lr", lr)
        self.momentum = _checks.finite_real("momentum", momentum)
        self.batch_size = _checks.integer("batch_size", batch_size, low=1)
        self.val_fraction = _checks.finite_real("val_fraction", val_fraction)
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.patience = _checks.integer("patience", patience, low=1)
        self.balance = _checks.boolean("balance", balance)
        self.progress = _checks.boolean("progress", progress)
        self.history: dict[str, dict[str, list[float]]] = {}

    # ---- fitting ----

    def fit(
        self,
        inputs: torch.Tensor | Iterable,
        owner: torch.Tensor | None = None,
        epochs: int = 30,
        *,
        experts: Sequence[int] | None = None,
    ) -> GatingTrainer:
        """Fit the gates on labelled membership: ``owner[i]`` is the expert whose domain input ``i`` belongs to.

        ``inputs``: a tensor ``[N, ...]`` with ``owner`` ``[N]``, or an iterable of ``(x, owner)`` batches (a
        DataLoader; ``owner`` then None). ``experts``: which PANs to fit (default all; the universal gate is one).
        Gates on calibrated (``z_``) features calibrate the experts first if they are not (``moe.calibrate``).
        """
        _checks.integer("epochs", epochs, low=1)
        if self.moe.combiner not in _TRAINABLE:
            raise ValueError(f"combiner={self.moe.combiner!r} has no gates to train")
        data = self._collect(inputs, owner, need_owner=True)
        self._calibrate(data)
        if self.moe.combiner == "universal":
            stats = self.moe.gate.statistics(data.logits, self.moe.class_counts, self.moe.calibration)  # [N, E, S]
            if self.moe.gate.standardise:
                self.moe.gate.fit_standardisation(stats)
            member = data.owner.unsqueeze(1) == torch.arange(self.moe.num_experts, device=data.owner.device)
            self._train_binary("universal", self.moe.gate, stats.flatten(0, 1), member.flatten(), epochs, 0)
            return self
        inputs_per_pan = self.moe.pan_inputs(data.logits, data.features)
        for i in self._pan_indices(experts, data.features):
            self._train_binary(f"pan[{i}]", self.moe.pans[i], inputs_per_pan[i], data.owner == i, epochs, i)
        return self

    def fit_data_free(
        self,
        own_inputs: Sequence[torch.Tensor | Iterable],
        epochs: int = 30,
        *,
        negatives: Sequence[str] = NEGATIVE_KINDS,
        negatives_per_positive: float = 1.0,
        experts: Sequence[int] | None = None,
    ) -> GatingTrainer:
        """Fit each PAN from its expert's OWN inputs only (``own_inputs[i]``: expert i's domain), with negatives
        synthesised: ``"noise"`` (Gaussian with the own data's per-position moments), ``"augment"`` (own inputs
        with their structure destroyed: positions shuffled, tiny crops blown up), ``"dream"`` (inputs that the
        OTHER experts are confident about, by gradient ascent on their weights: no data from their domains)."""
        if self.moe.combiner not in PAN_COMBINERS:
            raise ValueError(f"fit_data_free trains PANs; combiner is {self.moe.combiner!r}")
        if isinstance(own_inputs, torch.Tensor) or len(own_inputs) != self.moe.num_experts:
            raise ValueError(f"own_inputs must hold one input set per expert ({self.moe.num_experts})")
        if isinstance(negatives, str) or not negatives:
            raise TypeError(f"negatives must be a non-empty sequence of names, got {negatives!r}")
        kinds = [_checks.choice("negatives", k, NEGATIVE_KINDS) for k in negatives]
        _checks.finite_real("negatives_per_positive", negatives_per_positive)
        _checks.integer("epochs", epochs, low=1)
        owns = [self._as_tensor(x, f"own_inputs[{i}]") for i, x in enumerate(own_inputs)]
        probe = self._collect(owns[0][:2], None, need_owner=False) if self.moe.uses_features else None
        for i in self._pan_indices(experts, probe.features if probe is not None else None):
            own = owns[i]
            others = [e for j, e in enumerate(self.moe.experts) if j != i]
            with _seeded(self.seed * 1000 + i), _frozen(self.moe):
                fake = synthesise_negatives(own, kinds, max(1, round(negatives_per_positive * len(own))), others)
            data = self._collect(torch.cat([own, fake.to(own.dtype)]), None, need_owner=False)
            self._calibrate(data)
            values = self.moe.pan_inputs(data.logits, data.features)[i]
            is_own = torch.arange(len(values), device=values.device) < len(own)
            self._train_binary(f"pan[{i}]", self.moe.pans[i], values, is_own, epochs, i)
        return self

    def _calibrate(self, data: _Collected) -> None:
        if self.moe.needs_calibration and not self.moe.calibrated:
            self.moe.calibrate(data.row_shape)

    def _pan_indices(self, experts, features: list[torch.Tensor] | None = None) -> list[int]:
        if self.moe.combiner not in _TRAINABLE:
            raise ValueError(f"combiner={self.moe.combiner!r} has no gates to train")
        if self.moe.pans is None and features is not None:  # pan_features without feature_dims
            self.moe.build_pans([f.shape[1] for f in features])
        indices = list(range(self.moe.num_experts)) if experts is None else list(experts)
        for k, i in enumerate(indices):
            _checks.integer(f"experts[{k}]", i, low=0, high=self.moe.num_experts - 1)
        return indices

    def _train_binary(self, name, net: nn.Module, values, member, epochs: int, index: int) -> None:
        values = values.detach().float()
        member = member.long().to(values.device)
        gen = torch.Generator().manual_seed(self.seed * 1000 + index)
        order = torch.randperm(len(values), generator=gen).to(values.device)
        n_val = round(self.val_fraction * len(values))
        val, train = order[:n_val], order[n_val:]
        if len(train) == 0:
            raise ValueError(f"{name}: no training rows left after the validation split")
        counts = torch.bincount(member[train], minlength=2).float().clamp_min(1)
        weight = (counts.sum() / (2 * counts)) if self.balance else None
        loss_fn = nn.CrossEntropyLoss(weight=weight)
        with _seeded(self.seed * 1000 + index):
            for layer in net.modules():
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()
        optimiser = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=self.momentum)
        history = {"train_loss": [], "val_loss": [], "val_accuracy": []}
        best, best_state, waited = float("inf"), None, 0
        net.train()
        progress = _Progress(f"fit {name}", epochs) if self.progress else None
        for _ in range(epochs):
            perm = train[torch.randperm(len(train), generator=gen).to(values.device)]
            total = 0.0
            for start in range(0, len(perm), self.batch_size):
                rows = perm[start : start + self.batch_size]
                optimiser.zero_grad()
                loss = loss_fn(net(values[rows]), member[rows])
                loss.backward()
                optimiser.step()
                total += loss.item() * len(rows)
            history["train_loss"].append(total / len(perm))
            if n_val:
                with torch.no_grad():
                    out = net(values[val])
                    val_loss = loss_fn(out, member[val]).item()
                    acc = (out.argmax(1) == member[val]).float().mean().item()
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(acc)
            if progress is not None:
                metrics = {"loss": total / len(perm)}
                if n_val:
                    metrics |= {"val_loss": val_loss, "val_acc": acc}
                progress.epoch(metrics)
            if n_val:
                if val_loss < best:
                    best, best_state, waited = val_loss, copy.deepcopy(net.state_dict()), 0
                else:
                    waited += 1
                    if waited >= self.patience:
                        break
        if progress is not None:
            progress.close()
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        self.history[name] = history

    # ---- evaluation, files ----

    @torch.no_grad()
    def evaluate(
        self, inputs: torch.Tensor | Iterable, owner: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> GateEvaluation:
        """Who claimed what on labelled data (``inputs``/``owner`` as in ``fit``; ``targets`` ``[N]``: class
        indices over the union, for the classification accuracy; a DataLoader may yield ``(x, owner, target)``).
        Uses the plain input (no augmented passes)."""
        data = self._collect(inputs, owner, need_owner=True, targets=targets)
        domain = data.owner if self.moe.combiner == "oracle" else None
        combined, winner = self.moe.combine(data.logits, data.features, domain)
        num = self.moe.num_experts
        column = torch.where(winner < 0, num, winner).cpu()
        confusion = torch.zeros(num, num + 1, dtype=torch.int64)
        confusion.index_put_((data.owner.cpu(), column), torch.ones_like(column), accumulate=True)
        gate_accuracy = (winner.cpu() == data.owner.cpu()).float().mean().item() if len(column) else float("nan")
        accuracy = None
        if data.targets is not None:
            accuracy = (combined.argmax(1).cpu() == data.targets.cpu()).float().mean().item()
        return GateEvaluation(gate_accuracy, confusion, accuracy)

    def save(self, path: str | os.PathLike) -> None:
        """The moe's trained gates, as ``HeterogeneousMoE.save_gates`` (safetensors)."""
        self.moe.save_gates(path)

    def load(self, path: str | os.PathLike) -> GatingTrainer:
        self.moe.load_gates(path)
        return self

    # ---- inputs ----

    def _as_tensor(self, value, name: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        batches = [b[0] if isinstance(b, list | tuple) else b for b in value]
        if not batches:
            raise ValueError(f"{name} is empty")
        return torch.cat(batches)

    @torch.no_grad()
    def _collect(self, inputs, owner, *, need_owner: bool, targets=None) -> _Collected:
        """Every expert's outputs on every input, once; owners and targets aligned with them."""
        device = next(iter(self.moe.parameters())).device
        if isinstance(inputs, torch.Tensor):
            if need_owner:
                _checks.tensor("owner", owner, dim=1, integer=True)
                if len(owner) != len(inputs):
                    raise ValueError(f"owner has {len(owner)} rows but inputs has {len(inputs)}")
            if targets is not None:
                _checks.tensor("targets", targets, dim=1, integer=True)
                if len(targets) != len(inputs):
                    raise ValueError(f"targets has {len(targets)} rows but inputs has {len(inputs)}")
            batches = [
                (
                    inputs[s : s + _CHUNK],
                    owner[s : s + _CHUNK] if owner is not None else None,
                    targets[s : s + _CHUNK] if targets is not None else None,
                )
                for s in range(0, len(inputs), _CHUNK)
            ]
        else:
            if owner is not None or targets is not None:
                raise ValueError("with batches from a DataLoader, owner (and targets) come in the batches")
            if not isinstance(inputs, Iterable):
                raise TypeError(f"inputs must be a tensor or an iterable of batches, got {type(inputs).__name__}")
            batches = [self._unpack(b, need_owner) for b in inputs]
        if not batches:
            raise ValueError("inputs is empty")
        logits, feats, owners, tgts = [], [], [], []
        with _frozen(self.moe):
            for x, o, t in batches:
                lg, ft = self.moe.expert_outputs(x.to(device), features=self.moe.uses_features)
                logits.append(lg)
                feats.append(ft)
                owners.append(o)
                tgts.append(t)
        num = self.moe.num_experts
        first = batches[0][0]
        data = _Collected(
            row_shape=list(first.shape[1:]),
            logits=[torch.cat([b[i] for b in logits]) for i in range(num)],
            features=[torch.cat([b[i] for b in feats]) for i in range(num)] if self.moe.uses_features else None,
            owner=torch.cat(owners).to(device).long() if need_owner else None,
            targets=torch.cat(tgts).to(device).long() if tgts[0] is not None else None,
        )
        if need_owner and len(data.owner) and (data.owner.min() < 0 or data.owner.max() >= num):
            raise ValueError(f"owner must hold expert indices in [0, {num - 1}]")
        return data

    @staticmethod
    def _unpack(batch, need_owner: bool):
        if isinstance(batch, torch.Tensor):
            if need_owner:
                raise ValueError("each batch must be (x, owner) or (x, owner, target)")
            return batch, None, None
        if not isinstance(batch, list | tuple) or not 1 <= len(batch) <= 3 or (need_owner and len(batch) < 2):
            raise ValueError("each batch must be (x, owner) or (x, owner, target)")
        return batch[0], batch[1] if len(batch) > 1 else None, batch[2] if len(batch) > 2 else None


class _Progress:
    """Per-epoch progress on stderr: a tqdm bar on a terminal (redrawn at most every ``_REFRESH_S`` seconds), one
    line per epoch anywhere else, so a log file gets a readable record instead of thousands of redraws."""

    def __init__(self, name: str, epochs: int) -> None:
        self.name, self.epochs, self.done = name, epochs, 0
        self.stream = sys.stderr
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, desc=name, file=self.stream, mininterval=_REFRESH_S, leave=False)

    def epoch(self, metrics: dict[str, float]) -> None:
        self.done += 1
        shown = {k: f"{v:.3f}" for k, v in metrics.items()}
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        else:
            text = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"{self.name}: epoch {self.done}/{self.epochs} {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _frozen:
    """Experts in eval mode for the duration (restored after), so dropout/batch-norm do not move their outputs."""

    def __init__(self, moe: HeterogeneousMoE) -> None:
        self.experts = moe.experts

    def __enter__(self):
        self.modes = [e.training for e in self.experts]
        self.experts.eval()

    def __exit__(self, *exc):
        for e, mode in zip(self.experts, self.modes, strict=True):
            e.train(mode)


class _seeded:
    """A fixed global RNG state for the duration (the augmentations and layer init draw from it), restored after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)
