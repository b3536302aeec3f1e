"""Run transformers' own model tests for the MoE families of ``netmerge_fast.integrations.hf``, once as they are
and once with every model they build passed through ``hf.enable``, and compare test by test.

    python benchmarks/hf_model_tests.py /path/to/transformers            # a source checkout of transformers
    python benchmarks/hf_model_tests.py /path/to/transformers --families mixtral gpt_oss --out results/

The checkout must hold ``tests/models/<family>/test_modeling_<family>.py`` and the common test modules they import
(``tests/test_modeling_common.py``, ``tests/causal_lm_tester.py``, ``tests/generation/``, ...; the PyPI sdist has
only the top-level ones), at the version of the installed transformers. Nothing is downloaded
(``HF_HUB_OFFLINE=1``); the tests need ``pytest-timeout`` and ``parameterized`` besides ``netmerge-fast[test,hf]``.
Each run is one ``pytest`` process, one after another, under ``nice``, without transformers' ``conftest.py`` (it
would import transformers from the checkout's ``src``), with its defaults otherwise: tests marked slow skip
(``RUN_SLOW`` unset), no ``-x``; pipeline, tensor/expert-parallel and FSDP tests are switched off (see
``NOT_RUN``). ``hf_model_tests_plugin.py`` does the enabling and counting, and records each test's outcome
(subtests included). Writes ``<family>_<mode>.{log,json}`` and ``summary.json`` under ``--out``; prints the
per-family table and every test that passes as is but not enabled (exit status 1 if there is one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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
    env["NETMERGE_HF_RESULTS"] = str(out / f"{family}_{mode}.json")
    if mode == "enabled":
        env["NETMERGE_HF_ENABLE"] = "1"
    command = [
        "nice", "-n", "10", sys.executable, "-m", "pytest", str(test_file(root, family)),
        "--noconftest", "-c", os.devnull, "--rootdir", str(root), "-p", "hf_model_tests_plugin",
        "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
        f"--timeout={timeout}", "-q", "-rfE", *extra,
    ]  # fmt: skip
    with open(out / f"{family}_{mode}.log", "w") as log:
        subprocess.run(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)


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
            if not (args.reuse and (args.out / f"{family}_{mode}.json").is_file()):
                print(f"running {family} {mode} ...", flush=True)
                run_pytest(root, family, mode, args.out.resolve(), args.timeout, extra)
        results = {mode: json.loads((args.out / f"{family}_{mode}.json").read_text()) for mode in MODES}
        plain, enabled = ({t: r["outcome"] for t, r in results[mode]["tests"].items()} for mode in MODES)
        regressions[family] = sorted(t for t, o in plain.items() if o == "passed" and enabled.get(t) != "passed")
        summary[family] = {mode: results[mode]["summary"] for mode in MODES} | {
            "skipped_modules": results["enabled"]["skipped_modules"],
            "failed_in_both": sorted(t for t, o in plain.items() if o == "failed" == enabled.get(t)),
            "passed_plain_only": regressions[family],
        }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    return 1 if any(regressions.values()) else 0


def print_table(summary: dict) -> None:
    print("| family | mode | run | passed | failed | skipped | router calls | experts calls |")
    print("|---|---|---|---|---|---|---|---|")
    for family, s in summary.items():
        for mode in MODES:
            m = s[mode]
            print(
                f"| {family} | {mode} | {m['tests_run']} | {m.get('passed', 0)} | {m.get('failed', 0)} "
                f"| {m.get('skipped', 0)} | {m.get('router_calls', '-')} | {m.get('experts_calls', '-')} |"
            )
    for family, s in summary.items():
        for test in s["failed_in_both"]:
            print(f"{family}: fails with and without enable: {test}")
        for test in s["passed_plain_only"]:
            print(f"{family}: PASSES ONLY WITHOUT enable: {test}")


if __name__ == "__main__":
    sys.exit(main())
