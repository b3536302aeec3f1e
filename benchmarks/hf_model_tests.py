"""Run transformers' own model tests for the MoE families of ``netmerge_fast.integrations.hf``, once as they are
and once with every model they build passed through ``hf.enable``, and compare test by test.

    python benchmarks/hf_model_tests.py /path/to/transformers            # a source checkout or unpacked sdist
    python benchmarks/hf_model_tests.py /path/to/transformers --families mixtral gpt_oss --out results/

The checkout must hold ``tests/models/<family>/test_modeling_<family>.py`` and the common test modules they import
(``tests/test_modeling_common.py``, ``tests/causal_lm_tester.py``, ``tests/generation/``, ...), at the version of the
installed transformers. Nothing is downloaded (``HF_HUB_OFFLINE=1``); the tests need ``pytest-timeout`` and
``parameterized`` besides ``netmerge-fast[test,hf]``. Each run is one ``pytest`` process, one after another, under
``nice``, without transformers' ``conftest.py`` (it would import transformers from the checkout's ``src``), with
its defaults otherwise: tests marked slow skip (``RUN_SLOW`` unset), no ``-x``; pipeline, tensor/expert-parallel
and FSDP tests are switched off (see ``NOT_RUN``). The counting and enabling is done by
``hf_model_tests_plugin.py``. Writes ``<family>_<mode>.{log,xml}``, ``<family>_enabled_stats.json`` and
``summary.json`` under ``--out``; prints the per-family table and every test that passes as is but not enabled
(exit status 1 if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")
MODES = ("plain", "enabled")
HERE = Path(__file__).resolve().parent
# Pipeline tests load tiny models from the Hub; the tensor/expert-parallel and FSDP tests build their models in
# spawned processes that the plugin does not reach (they would run the same code in both modes).
NOT_RUN = dict.fromkeys(
    ("RUN_PIPELINE_TESTS", "RUN_TENSOR_PARALLEL_TESTS", "RUN_EXPERT_PARALLEL_TESTS", "RUN_FSDP_TESTS"), "no"
)


def test_file(root: Path, family: str) -> Path:
    path = root / "tests" / "models" / family / f"test_modeling_{family}.py"
    if not path.is_file():
        raise SystemExit(f"{path} not found: give the root of a transformers source checkout (it holds tests/models)")
    return path


def run_pytest(root: Path, family: str, mode: str, out: Path, timeout: int, extra: list[str]) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0", **NOT_RUN)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.pop("RUN_SLOW", None)
    env.pop("NETMERGE_HF_ENABLE", None)
    if mode == "enabled":
        env.update(NETMERGE_HF_ENABLE="1", NETMERGE_HF_STATS=str(out / f"{family}_enabled_stats.json"))
    command = [
        "nice", "-n", "10", sys.executable, "-m", "pytest", str(test_file(root, family)),
        "--noconftest", "-c", os.devnull, "--rootdir", str(root), "-p", "hf_model_tests_plugin",
        "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
        f"--timeout={timeout}", "-q", "-rfE", f"--junitxml={out / f'{family}_{mode}.xml'}", *extra,
    ]  # fmt: skip
    with open(out / f"{family}_{mode}.log", "w") as log:
        subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


def outcomes(xml_path: Path) -> dict[str, str]:
    """Test id -> passed / failed / skipped from pytest's JUnit XML (a test whose subtests fail counts as failed)."""
    result: dict[str, str] = {}
    for case in ET.parse(xml_path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        if result.get(test) != "failed":
            result[test] = "failed" if outcome == "failed" else result.get(test, outcome)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("transformers_root", type=Path, help="transformers source checkout (holds tests/models)")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path("hf_model_tests_results"))
    parser.add_argument("--timeout", type=int, default=600, help="seconds per test (pytest-timeout)")
    parser.add_argument("--reuse", action="store_true", help="compare the results already under --out")
    args, extra = parser.parse_known_args(argv)
    root = args.transformers_root.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    summary, regressions = {}, {}
    for family in args.families:
        for mode in MODES:
            if not (args.reuse and (args.out / f"{family}_{mode}.xml").is_file()):
                print(f"running {family} {mode} ...", flush=True)
                run_pytest(root, family, mode, args.out.resolve(), args.timeout, extra)
        plain, enabled = (outcomes(args.out / f"{family}_{mode}.xml") for mode in MODES)
        stats = json.loads((args.out / f"{family}_enabled_stats.json").read_text())
        summary[family] = {
            mode: {k: sum(v == k for v in res.values()) for k in ("passed", "failed", "skipped")} | {"run": len(res)}
            for mode, res in zip(MODES, (plain, enabled), strict=True)
        }
        summary[family]["netmerge"] = stats["totals"]
        summary[family]["skipped_modules"] = stats["skipped"]
        summary[family]["failed_in_both"] = sorted(t for t, o in plain.items() if o == "failed" == enabled.get(t))
        regressions[family] = sorted(t for t, o in plain.items() if o == "passed" and enabled.get(t) != "passed")
        summary[family]["passed_plain_only"] = regressions[family]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    return 1 if any(regressions.values()) else 0


def print_table(summary: dict) -> None:
    print("| family | mode | run | passed | failed | skipped | router calls | experts calls |")
    print("|---|---|---|---|---|---|---|---|")
    for family, s in summary.items():
        for mode in MODES:
            m, calls = s[mode], s["netmerge"] if mode == "enabled" else {}
            print(
                f"| {family} | {mode} | {m['run']} | {m['passed']} | {m['failed']} | {m['skipped']} "
                f"| {calls.get('router_calls', '-')} | {calls.get('experts_calls', '-')} |"
            )
    for family, s in summary.items():
        for test in s["failed_in_both"]:
            print(f"{family}: fails with and without enable: {test}")
        for test in s["passed_plain_only"]:
            print(f"{family}: PASSES ONLY WITHOUT enable: {test}")


if __name__ == "__main__":
    sys.exit(main())
