"""The package imports and works with nothing but torch: no extension, no Triton."""

import subprocess
import sys
import textwrap

import netmerge_fast as nf


def test_backends_report_every_backend_with_a_reason():
    status = nf.backends()
    assert set(status) == {"triton", "cuda", "cpu", "torch"}
    assert status["torch"].available
    for entry in status.values():
        assert isinstance(entry.available, bool) and entry.reason


def test_import_without_extension_and_without_triton():
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "netmerge_fast._C" or name == "triton" or name.startswith("triton."):
                    raise ImportError(f"blocked {name}")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        import netmerge_fast as nf

        status = nf.backends()
        assert not status["cpu"].available and "not built" in status["cpu"].reason, status["cpu"]
        assert not status["triton"].available and "not installed" in status["triton"].reason
        w, ids = nf.topk_gating(torch.randn(5, 8), 2)
        assert w.shape == (5, 2) and ids.dtype == torch.int32
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
