"""``netmerge-fast bench --plot out.png``: the speed-ups of every suite as grouped bars, one panel per suite."""

from __future__ import annotations

from typing import Any


def plot(results: dict[str, list[dict[str, Any]]], path: str, title: str = "netmerge-fast bench") -> None:
    """One panel per suite: per case, a bar per baseline (baseline time / ours, log scale; above 1 we are faster)
    and, where the suite has it, our fraction of the limit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install 'netmerge-fast[bench]'") from exc

    suites = {name: rows for name, rows in results.items() if rows}
    fig, axes = plt.subplots(len(suites), 1, figsize=(14, 4.2 * max(len(suites), 1)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], suites.items(), strict=True):
        series = sorted({key for row in rows for key in row if key.startswith("x_")})
        labels = [f"{row['shape']}\nT={row['T']}" for row in rows]
        width = 0.8 / (len(series) + ("of_limit" in rows[0]))
        for i, key in enumerate(series):
            values = [row.get(key, float("nan")) for row in rows]
            ax.bar([c + i * width for c in range(len(rows))], values, width, label=key.removeprefix("x_"))
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel("baseline time / ours")
        if "of_limit" in rows[0]:
            limit_ax = ax.twinx()
            positions = [c + len(series) * width for c in range(len(rows))]
            limit_ax.plot(positions, [row["of_limit"] for row in rows], "k^", label="ours: fraction of the limit")
            limit_ax.set_ylim(0, 1.05)
            limit_ax.set_ylabel("fraction of the limit")
            limit_ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks([c + 0.4 - width / 2 for c in range(len(rows))], labels, fontsize=7)
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=8, ncols=min(len(series), 5))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
