"""Every Triton kernel compiles for sm_80 and sm_90, GPU or not.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute; this checks that the compiler takes
them as written, which the interpreter never asks. Skipped where Triton or its NVIDIA backend is missing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia")

CHECK = Path(__file__).with_name("triton_compile_check.py")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, str(CHECK)], capture_output=True, text=True, env=env, timeout=900, cwd=CHECK.parent.parent
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_triton_kernel_compiles_for_sm80_and_sm90(compiled):
    assert compiled, "no kernels were checked"
    failures = {name: result for name, result in compiled.items() if result != "ok"}
    assert not failures, failures
