"""Per-row loops that follow the seed repository's combiners (cwkang1998/network-merging, 2 experts), and the same
rules generalised to E experts as combine_logits documents them: the independent oracles of tests/test_combine.py.

Deliberately slow and literal: one row, one expert at a time, Python scalars.
"""

import math

import torch

# ---- the seed's five methods, two experts, as its code computes them ----


def _winner_takes_all(parts, i, winner):
    fill = parts[winner][i].min()
    return torch.cat([p[i] if e == winner else torch.full_like(p[i], fill) for e, p in enumerate(parts)])


def seed_naive(out1, out2):
    return torch.cat([out1, out2], dim=1)


def seed_std(out1, out2):
    """Expert 1 if its (unbiased) std is strictly lower, else expert 2."""
    rows = []
    for i in range(len(out1)):
        winner = 0 if out1[i].std() < out2[i].std() else 1
        rows.append(_winner_takes_all((out1, out2), i, winner))
    return torch.stack(rows)


def _seed_ratio_row(row):
    total = torch.sum(row)
    return torch.stack([v / total for v in row])


def seed_ratio(out1, out2):
    return torch.cat([torch.stack([_seed_ratio_row(r) for r in out]) for out in (out1, out2)], dim=1)


def seed_overall_ratio(out1, out2):
    return torch.stack([_seed_ratio_row(r) for r in torch.cat([out1, out2], dim=1)])


def _seed_percentile(t, q):
    """The seed's helper: q is meant in percent, and the seed passes 0.75."""
    k = 1 + round(0.01 * float(q) * (t.numel() - 1))
    return t.view(-1).kthvalue(k).values.item()


def seed_third_q(out1, out2):
    """Expert 1 if max - percentile(0.75) is strictly larger, else expert 2."""
    rows = []
    for i in range(len(out1)):
        gap1 = out1[i].max() - _seed_percentile(out1[i], 0.75)
        gap2 = out2[i].max() - _seed_percentile(out2[i], 0.75)
        rows.append(_winner_takes_all((out1, out2), i, 0 if gap1 > gap2 else 1))
    return torch.stack(rows)


# ---- the documented rules, E experts, one row at a time ----


def _quantile(values, q):
    """torch.quantile's linear interpolation, with the documented limits at infinities."""
    v = sorted(values)
    position = q * (len(v) - 1)
    lower = math.floor(position)
    w = position - lower
    a, b = v[lower], v[min(lower + 1, len(v) - 1)]
    if w == 0 or a == b:
        return a
    if math.isinf(a) and math.isinf(b):
        return math.nan
    if math.isinf(a) or math.isinf(b):
        return a if math.isinf(a) else b
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


def _softmax(values):
    """Softmax in its limits: +inf logits share the mass, an all -inf expert is uniform."""
    top = max(values)
    if math.isinf(top):
        weights = [1.0 if v == top else 0.0 for v in values]
    else:
        weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def row_criterion(values, method):
    """One expert's criterion for one row (Python floats, float64 arithmetic)."""
    if any(math.isnan(v) for v in values):
        return math.nan
    hi, lo = max(values), min(values)
    if method == "std":
        if len(values) == 1:
            return math.nan
        if hi == lo:
            return 0.0
        return torch.tensor(values, dtype=torch.float64).std().item()
    if method == "range":
        return 0.0 if hi == lo else hi - lo
    if method == "third_quartile":
        q3 = _quantile(values, 0.75)
        return 0.0 if hi == q3 else hi - q3
    if method == "margin":
        if len(values) == 1:
            return math.inf
        top2 = sorted(values, reverse=True)[:2]
        return 0.0 if top2[0] == top2[1] else top2[0] - top2[1]
    p = _softmax(values)
    if method == "max_prob":
        return max(p)
    if method == "entropy":
        return -sum(pi * math.log(pi) for pi in p if pi > 0)
    if method == "energy":  # the largest logsumexp (lowest energy) wins
        if math.isinf(hi):
            return hi
        return hi + math.log(sum(math.exp(v - hi) for v in values))
    raise ValueError(method)


LOWER_WINS = {"std", "entropy"}


def _divide(a, b):
    """IEEE division (Python raises on a zero divisor)."""
    if b != 0 or math.isnan(a) or math.isnan(b):
        return a / b if b != 0 else math.nan
    return math.nan if a == 0 else math.copysign(math.inf, a) * math.copysign(1.0, b)


def per_row_combine(parts, method, gate=None):
    """(combined [B, sum C_i] float64, winner list) by the documented rules, looping over rows and experts."""
    B = parts[0].shape[0]
    rows, winners = [], []
    for i in range(B):
        segments = [p[i].double().tolist() for p in parts]
        concat = [v for s in segments for v in s]
        winner = -1
        if method in ("ratio", "overall_ratio"):
            total = sum(concat)
            row = [_divide(v, sum(s) if method == "ratio" else total) for s in segments for v in s]
            rows.append(row)
            winners.append(-1)
            continue
        if method == "gate" and gate.dtype == torch.bool:
            claims = [e for e, c in enumerate(gate[i].tolist()) if c]
            winner = claims[0] if len(claims) == 1 else -1
        elif method != "naive":
            scores = (
                [float(torch.tensor(g, dtype=torch.float32)) for g in gate[i].tolist()]
                if method == "gate"
                else [row_criterion(s, method) for s in segments]
            )
            lower = method in LOWER_WINS
            for e, c in enumerate(scores):
                if math.isnan(c):
                    continue
                if winner < 0 or (c < scores[winner] if lower else c > scores[winner]):
                    winner = e
        if winner < 0:
            rows.append(concat)
        else:
            fill = math.nan if any(math.isnan(v) for v in segments[winner]) else min(segments[winner])
            rows.append([v if e == winner else fill for e, s in enumerate(segments) for v in s])
        winners.append(winner)
    return torch.tensor(rows, dtype=torch.float64).reshape(B, -1), winners
