"""benchmarks/gpu_check.py --dry-run: every step of the GPU check runs end to end on CPU (tiny sizes, Triton
through its interpreter), so the script a GPU session runs has been executed before it gets there."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=SCRIPT.parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["versions"]["torch"]
    assert report["tests"]["returncode"] == 0 and "skipped" in report["tests"]["summary"]
    assert report["limits"]["copy_bytes_per_s"] > 0 and report["limits"]["bf16_mm_flops"] > 0
    ops = {row["op"] for row in report["rows"]}
    assert ops == {"moe_experts", "SparseMoE", "topk_gating", "logit_statistics", "combine third_q"}
    for row in report["rows"]:
        assert row["ours_us"] > 0 and row["of_limit"] > 0, row
    experts = [row for row in report["rows"] if row["op"] == "moe_experts"]
    assert all(row["x_torch_grouped_mm"] > 0 for row in experts)
    assert report["skipped"] == [] and report["errors"] == []
    assert set(report["step_seconds"]) == {"moe_experts tiny qwen3 E8 k4", "SparseMoE tiny qwen3 E8 k4",
                                           "topk_gating", "statistics"}  # fmt: skip
    # Every file with cuda-marked tests was collected (they all skip here).
    assert "tests/test_cuda_graphs.py" in report["tests"]["command"]
    assert "tests/test_moe_experts.py" in report["tests"]["command"]
    assert "| op " in done.stdout  # the table
