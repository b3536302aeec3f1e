"""One short run on a CUDA GPU: versions, the cuda-marked tests, and one table of measured speed.

    python benchmarks/gpu_check.py [--json out.json] [--tokens 1,8,64] [--skip-tests] [--budget-s 450]
    python benchmarks/gpu_check.py --dry-run      # every step on CPU at tiny sizes, Triton through its interpreter

Builds nothing: it runs the installed netmerge_fast (``pip install --no-build-isolation -e .`` beforehand builds
the CUDA kernels where torch has CUDA and nvcc is found). Steps:

1. versions: GPU, capability, SMs, driver, CUDA, torch, triton, transformers, and the backends' status;
2. ``pytest -m cuda tests`` (the cuda-marked tests: bfloat16 on the tl.dot paths, CUDA statistics against the CPU,
   CUDA-graph capture, no host sync), its summary line;
3. limits measured here with ``triton.testing.do_bench`` (median): a 1 GiB device copy (bytes moved per second)
   and a dense bfloat16 matmul 8192^3 (FLOP/s);
4. one table, every time a ``do_bench`` median in the same process, ratios = baseline time / ours, measured in
   this order (the expert GEMMs first, so a tight budget drops the cheap cases):
   - moe_experts on Mixtral-8x7B (E=8, k=2, H=4096, I=14336) and Qwen3-30B-A3B (E=128, k=8, H=2048, I=768) in
     bfloat16 vs the shortest ``torch._grouped_mm`` pipeline and transformers' ``grouped_mm`` experts, and
     SparseMoE vs the transformers MoE blocks (``grouped_mm`` and ``eager`` experts), for T in {1, 8, 64, 512,
     4096, 16384}: the fraction of the limit, the larger of FLOPs at the dense-matmul rate and the touched
     expert weights at the copy rate (decode routings rotate so weights come from memory, not L2);
   - topk_gating (Mixtral, Qwen3-30B-A3B, DeepSeek-V3 routing) vs the eager routing code of the HF family and
     its ``torch.compile``: GB/s and the fraction of the copy rate;
   - combine_logits / logit_statistics (CUDA) vs the torch reference on the GPU: GB/s, fraction of the copy rate.

Time: under 8 minutes on one H100/H200. The tests get at most --tests-timeout-s; the measurements run in the
order above while the elapsed time stays below --budget-s (cases past it are listed as skipped). The first
call of each shape compiles its Triton kernels (a few seconds each), which the warm-up absorbs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENS = (1, 8, 64, 512, 4096, 16384)
DRY_TOKENS = (1, 5)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write everything as JSON here")
    p.add_argument("--tokens", type=lambda s: tuple(int(t) for t in s.split(",")), help="T values (default: all)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the cuda-marked tests")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop measuring after this many seconds overall")
    p.add_argument("--tests-timeout-s", type=float, default=200.0)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter: checks the script")
    return p.parse_args(argv)


def versions(device) -> dict:
    import torch

    import netmerge_fast

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    for name in ("triton", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count)
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            smi = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            info["driver"] = subprocess.run(smi, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = None
    info["backends"] = {name: str(status) for name, status in netmerge_fast.backends().items()}
    return info


def cuda_test_files() -> list[str]:
    """The test files holding cuda-marked tests: collecting only them keeps a file whose optional imports (the
    demos' data packages) are missing on the GPU machine from stopping the run."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def run_tests(dry_run: bool, timeout: float) -> dict:
    """The cuda-marked tests, in 4 processes on a GPU (compiling the kernels' variants is most of their time; in a
    dry run they all skip)."""
    target = [*([] if dry_run else ["-n", "4"]), *cuda_test_files()]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *target]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
        summary, code = (lines[-1] if lines else "(no output)"), done.returncode
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    except subprocess.TimeoutExpired:
        summary, code, failures = f"timed out after {timeout:.0f} s", None, []
    return {"command": " ".join(cmd), "summary": summary, "returncode": code, "failures": failures,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


class Timer:
    """Median seconds of fn(): triton.testing.do_bench on a GPU, the CPU harness otherwise (dry run)."""

    def __init__(self, device, deadline: float, skipped: list):
        self.device, self.deadline, self.skipped = device, deadline, skipped

    def __call__(self, fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3
        from netmerge_fast.bench import time_call

        return time_call(fn, self.device, min_run_s=0.0, repeats=1, max_calls=1)

    def out_of_time(self, case: str) -> bool:
        if time.perf_counter() < self.deadline:
            return False
        self.skipped.append(case)
        return True


def measure_limits(device, timer, dry_run: bool) -> dict:
    import torch

    n_bytes, n = (1 << 20, 64) if dry_run else (1 << 30, 8192)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    copy = 2 * n_bytes / timer(lambda: dst.copy_(src))
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm = 2 * n**3 / timer(lambda: torch.mm(a, b))
    return {"copy_bytes_per_s": copy, "bf16_mm_flops": mm}


def _row(op, shape, T, ours, baselines, rate, rate_unit, limit, of_limit):
    row = {"op": op, "shape": shape, "T": T, "ours_us": ours * 1e6}
    for name in ("eager", "compiled", "torch_grouped_mm", "hf_grouped_mm", "hf_eager", "reference"):
        row[f"x_{name}"] = baselines[name] / ours if name in baselines else float("nan")
    row.update({f"{name}_us": seconds * 1e6 for name, seconds in baselines.items()})
    row.update(rate=rate, unit=rate_unit, limit=limit, of_limit=of_limit)
    return row


def topk_rows(device, timer, tokens, limits, dry_run):
    import torch

    import netmerge_fast as nf
    from netmerge_fast.bench import topk as topk_bench

    shapes = [s for s in topk_bench.SHAPES if not s.name.startswith("E64")]
    backend = "triton" if dry_run else "auto"
    rows = []
    for shape in shapes[:1] if dry_run else shapes:
        bias = torch.randn(shape.num_experts, device=device) * 0.1 if shape.bias else None
        options = dict(shape.options, bias=bias)
        eager = topk_bench.hf_eager(shape)
        # One compile per shape (dynamic T); the dry run only traces, with the eager backend.
        compiled = torch.compile(eager, dynamic=True, backend="eager" if dry_run else "inductor")
        for T in tokens:
            if timer.out_of_time(f"topk_gating {shape.name} T={T}"):
                continue
            x = torch.randn(T, shape.num_experts, device=device, dtype=torch.bfloat16)
            ours = timer(lambda x=x, s=shape, o=options: nf.topk_gating(x, s.k, backend=backend, **o))
            baselines = {
                "eager": timer(lambda x=x, f=eager, b=bias: f(x, b)),
                "compiled": timer(lambda x=x, f=compiled, b=bias: f(x, b)),
            }
            moved = x.numel() * x.element_size() + T * shape.k * 8
            rate = moved / ours
            rows.append(_row("topk_gating", shape.name, T, ours, baselines, rate / 1e9, "GB/s", "copy",
                             rate / limits["copy_bytes_per_s"]))  # fmt: skip
    return rows


def moe_shapes(dry_run):
    from netmerge_fast.bench.dispatch import Shape

    if dry_run:  # T=1: 4 slots for 8 experts, the per-slot path; T=5: 20 slots, the aligned tl.dot path
        return [Shape("tiny qwen3 E8 k4", 8, 4, 32, 16)]
    return [Shape("mixtral E8 k2", 8, 2, 4096, 14336), Shape("qwen3 E128 k8", 128, 8, 2048, 768)]


def _limit(shape, T, routings, limits):
    """(label, seconds): the larger of the FLOPs at the dense-matmul rate and the touched weights at the copy rate."""
    H, inter = shape.hidden, shape.intermediate
    flops = 2 * T * shape.k * H * 3 * inter
    touched = sum(len(set(r.reshape(-1).tolist())) for r in routings) / len(routings)
    weight_bytes = touched * 3 * H * inter * 2
    compute, memory = flops / limits["bf16_mm_flops"], weight_bytes / limits["copy_bytes_per_s"]
    return ("dense mm", compute) if compute >= memory else ("bandwidth", memory)


def _decode_inputs(shape, T):
    """How many routings to rotate through: enough to cover every expert twice when a call touches few."""
    return max(1, -(-2 * shape.num_experts // (T * shape.k))) if T * shape.k <= 4 * shape.num_experts else 1


def _experts_rows(shape, device, timer, tokens, limits, dry_run):
    import torch

    import netmerge_fast as nf
    from netmerge_fast.bench import dispatch as dispatch_bench

    backend = "triton" if dry_run else "auto"
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    E, H, inter = shape.num_experts, shape.hidden, shape.intermediate
    w_gate_up = torch.randn(E, 2 * inter, H, device=device, dtype=dtype) * H**-0.5
    w_down = torch.randn(E, H, inter, device=device, dtype=dtype) * inter**-0.5
    baselines = {"torch_grouped_mm": dispatch_bench.torch_grouped_mm_pipeline(w_gate_up, w_down)}
    hf = dispatch_bench.hf_experts(shape, w_gate_up, w_down)
    if hf is not None:
        baselines["hf_grouped_mm"] = dispatch_bench.hf_call(hf, "grouped_mm")

    def ours_fn(hidden, weights, ids):
        return nf.moe_experts(hidden, w_gate_up, w_down, weights, ids, backend=backend)

    rows = []
    for T in tokens:
        if timer.out_of_time(f"moe_experts {shape.name} T={T}"):
            continue
        # Decode routings rotate over the experts so that every call reads its weights from memory.
        routings = dispatch_bench.rotating_routings(shape, T, _decode_inputs(shape, T), generator)
        inputs = [
            (torch.randn(T, H, generator=generator).to(device, dtype),
             torch.softmax(torch.randn(T, shape.k, generator=generator), -1).to(device), ids.to(device))
            for ids in routings
        ]  # fmt: skip
        with torch.no_grad():
            ours = timer(dispatch_bench.cycle_calls(ours_fn, inputs))
            times = {name: timer(dispatch_bench.cycle_calls(fn, inputs)) for name, fn in baselines.items()}
        label, seconds = _limit(shape, T, routings, limits)
        flops = 2 * T * shape.k * H * 3 * inter
        rows.append(_row("moe_experts", shape.name, T, ours, times, flops / ours / 1e12, "TFLOP/s", label,
                         seconds / ours))  # fmt: skip
    return rows


def _layer_rows(shape, device, timer, tokens, limits, dry_run):
    """SparseMoE against the transformers MoE block of the family, on the same weights."""
    import torch

    from netmerge_fast.bench import dispatch as dispatch_bench
    from netmerge_fast.bench import layer as layer_bench

    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(1)
    block, config, ours = layer_bench.loaded_pair(shape, device, dtype)
    if dry_run:  # the Triton kernels, through the interpreter
        for module in ours.modules():
            if hasattr(module, "backend"):
                module.backend = "triton"

    def hf_forward(x, implementation):
        config._experts_implementation = implementation
        return block(x)

    rows = []
    for T in tokens:
        if timer.out_of_time(f"SparseMoE {shape.name} T={T}"):
            continue
        inputs = [(torch.randn(1, T, shape.hidden, generator=generator).to(device, dtype),)
                  for _ in range(_decode_inputs(shape, T))]  # fmt: skip
        with torch.no_grad():
            routings = []
            for (x,) in inputs:
                ours(x)
                routings.append(ours.topk_ids)
            seconds_ours = timer(dispatch_bench.cycle_calls(ours, inputs))
            times = {
                f"hf_{impl}": timer(dispatch_bench.cycle_calls(lambda x, impl=impl: hf_forward(x, impl), inputs))
                for impl in ("grouped_mm", "eager")
            }
        label, seconds = _limit(shape, T, routings, limits)
        flops = 2 * T * shape.k * shape.hidden * 3 * shape.intermediate
        rows.append(_row("SparseMoE", shape.name, T, seconds_ours, times, flops / seconds_ours / 1e12, "TFLOP/s",
                         label, seconds / seconds_ours))  # fmt: skip
    return rows


def combine_rows(device, timer, limits, dry_run):
    import torch

    import netmerge_fast as nf

    backend = "cuda" if device.type == "cuda" else "cpu"
    # (rows, class counts): the seed's 2 x 10 classes, three 1000-class experts (a block per segment), one
    # 100k-class expert (radix select over long rows), 64 small experts (lane groups).
    cases = [(65536, [10, 10]), (4096, [1000] * 3), (64, [100_000, 10]), (4096, [5, 9, 3, 7] * 16)]
    if dry_run:
        cases = [(8, [10, 10]), (4, [300, 7])]
    rows = []
    for B, counts in cases:
        x = torch.randn(B, sum(counts), device=device)
        name = (
            f"B{B} C{counts[0]}x{len(counts)}" if len(set(counts)) == 1 else f"B{B} C{'+'.join(map(str, counts[:4]))}"
        )
        for op, call in (
            ("logit_statistics", lambda b, x=x, c=counts: nf.logit_statistics(x, c, stats=("mean", "std", "max"),
                                                                             backend=b)),
            ("combine third_q", lambda b, x=x, c=counts: nf.combine_logits(x, c, method="third_quartile", backend=b)),
        ):  # fmt: skip
            if timer.out_of_time(f"{op} {name}"):
                continue
            with torch.no_grad():
                ours = timer(lambda call=call: call(backend))
                reference = timer(lambda call=call: call("torch"))
            moved = x.numel() * x.element_size() * (2 if op.startswith("combine") else 1)
            rate = moved / ours
            rows.append(_row(op, name, B, ours, {"reference": reference}, rate / 1e9, "GB/s", "copy",
                             rate / limits["copy_bytes_per_s"]))  # fmt: skip
    return rows


COLUMNS = ("op", "shape", "T", "ours_us", "x_eager", "x_compiled", "x_torch_grouped_mm", "x_hf_grouped_mm",
           "x_hf_eager", "x_reference", "rate", "unit", "limit", "of_limit")  # fmt: skip


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before netmerge_fast imports its Triton kernels
    import torch

    from netmerge_fast.bench import format_table

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure (use --dry-run to check the script on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if not args.dry_run else "cpu")
    tokens = args.tokens or (DRY_TOKENS if args.dry_run else TOKENS)
    report = {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run, "versions": versions(device)}
    print(json.dumps(report["versions"], indent=1))
    rows = report["rows"] = []
    report.update(skipped=[], errors=[], step_seconds={})

    def save():  # after every step: a run stopped from outside still leaves what it measured
        report["seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=float))

    save()
    if not args.skip_tests:
        report["tests"] = run_tests(args.dry_run, args.tests_timeout_s)
        print(f"cuda-marked tests: {report['tests']['summary']} ({report['tests']['seconds']} s)")
        for line in report["tests"]["failures"]:
            print(f"  {line}")
    timer = Timer(device, start + args.budget_s, report["skipped"])
    save()
    limits = report["limits"] = measure_limits(device, timer, args.dry_run)
    print(f"copy {limits['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 mm {limits['bf16_mm_flops'] / 1e12:.0f} TFLOP/s")
    steps = [(f"{what} {shape.name}", fn, (shape, device, timer, tokens, limits, args.dry_run))
             for shape in moe_shapes(args.dry_run) for what, fn in (("moe_experts", _experts_rows),
                                                                     ("SparseMoE", _layer_rows))]  # fmt: skip
    steps += [("topk_gating", topk_rows, (device, timer, tokens, limits, args.dry_run)),
              ("statistics", combine_rows, (device, timer, limits, args.dry_run))]  # fmt: skip
    for name, fn, step_args in steps:
        save()
        step_start = time.perf_counter()
        try:
            rows += fn(*step_args)
        except Exception as exc:  # one failing step (a transformers version, say) must not lose the others
            report["errors"].append({"step": name, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()[-3000:]})  # fmt: skip
            print(f"step {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        report["step_seconds"][name] = round(time.perf_counter() - step_start, 1)
    save()
    print(format_table(rows, COLUMNS))
    if timer.skipped:
        print(f"skipped (time budget {args.budget_s:.0f} s): {', '.join(timer.skipped)}")
    print(f"done in {report['seconds']} s")
    tests_failed = report.get("tests", {}).get("returncode") not in (0, 5, None)  # 5: nothing collected
    return 1 if tests_failed or report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
