"""``netmerge-fast``: the command line (also ``python -m netmerge_fast.cli``).

netmerge-fast bench                 a representative quick run (topk, dispatch, layer: a few cases each, ~2 min)
netmerge-fast bench --full          every case of those suites (tens of minutes on 2 cores)
netmerge-fast bench topk            one suite (topk, dispatch, layer, combine, hf), its representative cases
netmerge-fast bench topk --json out.json --quick
netmerge-fast bench dispatch layer --dtype bfloat16 --plot out.png
netmerge-fast bench hf              whole Hugging Face MoE models with integrations.hf.enable (not in the default)
netmerge-fast bench hf_layout       GPT-OSS blocks on their own layout against the old in-place conversion
netmerge-fast bench ep              expert parallelism over 1, 2, 4 local processes (Gloo; not in the default)
netmerge-fast backends              what this machine can run
netmerge-fast demo                  the Kang et al. reproduction table (needs the `demo` extra)
netmerge-fast demo --seeds 5 --json table.json --plot table.png
netmerge-fast demo --universal-stats mean,std,max   the universal gates on the paper's raw statistics
netmerge-fast demo --full           the seed's 10 seeds, LeNet5s trained for as many steps as the seed's
netmerge-fast demo NAME ...         another reproduction (see DEMOS)
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

# Suite name -> module in netmerge_fast.bench exposing run(**kwargs) -> rows and COLUMNS.
SUITES = {
    "topk": "netmerge_fast.bench.topk",
    "dispatch": "netmerge_fast.bench.dispatch",
    "layer": "netmerge_fast.bench.layer",
    "combine": "netmerge_fast.bench.combine",
    "hf": "netmerge_fast.bench.hf",
    "hf_layout": "netmerge_fast.bench.hf_layout",
    "ep": "netmerge_fast.bench.ep",
    "capacity": "netmerge_fast.bench.capacity",
    "switch": "netmerge_fast.bench.switch",
}
# combine is left out of the default: its reference and per-row baselines take minutes.
DEFAULT_SUITES = ("topk", "dispatch", "layer")
# Without --full or --quick a suite runs its DEFAULT cases (all of them if it has none).
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bench(args: argparse.Namespace) -> int:
    from netmerge_fast.bench import format_table, machine_info, write_json

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = args.suites or list(DEFAULT_SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}", file=sys.stderr)
        return 2
    mode = "full" if args.full else "quick" if args.quick else "default"
    print(f"# netmerge-fast bench ({mode} cases) on {machine_info(device)}", flush=True)
    plans = []
    for name in names:
        suite = importlib.import_module(SUITES[name])
        kwargs = {"device": device, "dtype": _DTYPES[args.dtype], "compile": not args.no_compile}
        if mode != "full":
            kwargs.update(getattr(suite, "QUICK" if mode == "quick" else "DEFAULT", {}))
        plans.append((name, suite, kwargs))
    results = {}
    # Suites without a cases() count leave the bar without a total.
    counts = [suite.cases(**kwargs) if hasattr(suite, "cases") else None for _, suite, kwargs in plans]
    with _Progress(None if None in counts else sum(counts)) as progress:
        for name, suite, kwargs in plans:
            results[name] = suite.run(progress=progress, **kwargs)
    for name, suite, _ in plans:
        rows = results[name]
        print(f"\n## {name}\n")
        print(format_table(rows, [c for c in suite.COLUMNS if any(c in r for r in rows)]), flush=True)
    if args.json:
        write_json(args.json, results, device)
        print(f"\nwrote {args.json}")
    if args.plot:
        from netmerge_fast.bench.plot import plot

        plot(results, args.plot, title=f"netmerge-fast bench ({args.dtype}, {device})")
        print(f"wrote {args.plot}")
    return 0


class _Progress:
    """The suites' progress callback: a tqdm bar on a terminal (refreshed at most twice a second), one line per
    case otherwise, so that a log is not flooded; on stderr, apart from the tables."""

    def __init__(self, total: int | None) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="case", mininterval=0.5, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, message: str) -> None:
        if self.bar is None:
            print(f"  ... {message}", file=sys.stderr, flush=True)
            return
        if self.bar.n or self.bar.postfix:  # a case is done when the next one starts
            self.bar.update()
        self.bar.set_postfix_str(message, refresh=False)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n if self.bar.total else 1)
            self.bar.close()


def _backends(_args: argparse.Namespace) -> int:
    import netmerge_fast

    for name, status in netmerge_fast.backends().items():
        print(f"{name:7s} {status}")
    return 0


# Reproduction name -> module in netmerge_fast.demo exposing cli(args) -> exit code; they share the demo's flags
# (--seeds, --quick, --json, --plot). Without a name, `demo` runs the Kang et al. table.
DEMOS: dict[str, str] = {
    "deep-moe": "netmerge_fast.demo.deep_moe",  # Eigen, Ranzato & Sutskever (2013) on jittered MNIST
    "expert-merging": "netmerge_fast.demo.expert_merging",  # Park (2024): usage-driven expert merging
    "load-balance": "netmerge_fast.demo.load_balance",  # aux loss vs DeepSeek-V3's selection bias vs neither
    "universal-transfer": "netmerge_fast.demo.unseen_experts",  # Kang et al.: the universal gate on unseen experts
}


def _demo(args: argparse.Namespace) -> int:
    if args.seeds is not None and args.seeds < 1:
        print("--seeds must be at least 1", file=sys.stderr)
        return 2
    if args.experiment is None:
        return _kang_demo(args)
    try:
        module = importlib.import_module(DEMOS[args.experiment])
    except ImportError as error:  # pragma: no cover - the message is the point
        print(f"netmerge-fast demo needs the demo extra (pip install 'netmerge-fast[demo]'): {error}", file=sys.stderr)
        return 2
    return module.cli(args)


def _kang_demo(args: argparse.Namespace) -> int:
    import copy
    import time

    try:
        from netmerge_fast.demo import reproduction
    except ImportError as error:  # pragma: no cover - the message is the point
        print(f"netmerge-fast demo needs the demo extra (pip install 'netmerge-fast[demo]'): {error}", file=sys.stderr)
        return 2
    settings = copy.copy(reproduction.FULL if args.full else reproduction.Settings())
    if args.universal_stats:
        from netmerge_fast.nn.universal_gate import FEATURES

        names = tuple(args.universal_stats.split(","))
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            print(
                f"--universal-stats: unknown feature(s) {unknown}; choose from {', '.join(FEATURES)}", file=sys.stderr
            )
            return 2
        settings.universal_stats = names
    args.seeds = args.seeds or (10 if args.full else 5)
    start = time.perf_counter()
    table = reproduction.run(
        args.seeds,
        quick=args.quick,
        settings=settings,
        progress=lambda m: print(f"  ... {m}", file=sys.stderr, flush=True),
        # --quick (smoke tests) runs in this process: starting worker processes would cost more than its seeds.
        workers=1 if args.quick else None,
    )
    mode = " (quick)" if args.quick else " (full)" if args.full else ""
    counts = {name: len(rows["naive"]["per_seed"]) for name, rows in table.items()}
    fewer = ", ".join(f"{name}: {n}" for name, n in counts.items() if n != args.seeds)
    print(f"# test accuracy (%), mean ± std over {args.seeds} seeds{f' ({fewer})' if fewer else ''}{mode}\n")
    print(reproduction.format_table(table), flush=True)
    if args.json:
        reproduction.write_json(args.json, table)
        print(f"\nwrote {args.json}")
    if args.plot:
        reproduction.plot(args.plot, table)
        print(f"wrote {args.plot}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netmerge-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time our ops against their baselines, in one process")
    bench.add_argument("suites", nargs="*", help=f"suites to run (default: {' '.join(DEFAULT_SUITES)})")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    sizes = bench.add_mutually_exclusive_group()
    sizes.add_argument("--full", action="store_true", help="every case of the suites (tens of minutes on 2 cores)")
    sizes.add_argument("--quick", action="store_true", help="fewer, smaller cases (seconds, for smoke tests)")
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="PATH", help="also draw the speed-ups as a PNG (needs matplotlib)")
    bench.set_defaults(func=_bench)

    backends = sub.add_parser("backends", help="which backends this machine has, and why not")
    backends.set_defaults(func=_backends)

    demo = sub.add_parser("demo", help="the reproductions: by default every combiner on three problems (Kang et al.)")
    demo.add_argument("experiment", nargs="?", choices=sorted(DEMOS), help="another reproduction")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per model or problem (default: the demo's own)")
    demo.add_argument("--quick", action="store_true", help="few epochs (seconds, for smoke tests)")
    demo.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    demo.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart")
    demo.add_argument("--full", action="store_true", help="Kang et al. table: the seed's 10 seeds, longer LeNet5s")
    stats_help = "Kang et al. table: the universal gates' features (e.g. mean,std,max: the paper's)"
    demo.add_argument("--universal-stats", metavar="A,B,...", help=stats_help)
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
