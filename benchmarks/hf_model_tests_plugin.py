"""pytest plugin of ``benchmarks/hf_model_tests.py``: with ``NETMERGE_HF_ENABLE=1``, every model transformers' own
tests build is passed through ``netmerge_fast.integrations.hf.enable``, and the router and experts calls that run
through netmerge-fast are counted per test; in both modes each test's outcome is written, with those counts, to
``NETMERGE_HF_RESULTS`` as JSON at the end of the session.

A model is enabled once, at the top level: at the end of its ``post_init`` (the last step of every transformers
model's ``__init__``, so ``Model(config)`` and ``from_config`` are covered; submodels built inside another model's
``__init__`` are left to their parent) and after ``from_pretrained`` has loaded its weights. Calls are counted where
the patched code runs: ``hf.topk_gating`` inside the routers' replaced forwards and ``hf.run_validated`` inside the
``"netmerge"`` experts implementation (empty batches, such as ``enable``'s own checks, are not counted, nor calls
inside a ``torch.compile`` graph, which run the same code but would be recompiled on every count).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import warnings

import pytest
import torch

COUNTS = ("enabled_models", "routers_patched", "experts_patched", "router_calls", "experts_calls")


class OutcomeRecorder:
    """Keeps each test's outcome (``failed`` if any phase or subtest failed, ``skipped`` if the test itself skipped,
    else ``passed``: a skipped subtest does not skip its test) and, with ``NETMERGE_HF_ENABLE=1``, installs the
    patches and keeps the counts of ``COUNTS`` per test; written as JSON to ``NETMERGE_HF_RESULTS``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.current = collections.Counter()
        self.skip_reasons = collections.Counter()
        self.tests = {}
        if enabled:
            from transformers import PreTrainedModel

            from netmerge_fast.integrations import hf

            self.hf = hf
            self._patch(PreTrainedModel)

    def _patch(self, base) -> None:
        hf, counter = self.hf, self
        post_init, from_pretrained = base.post_init, base.from_pretrained.__func__
        topk_gating, run_validated = hf.topk_gating, hf.run_validated

        def enabling_post_init(model, *args, **kwargs):
            out = post_init(model, *args, **kwargs)
            if not _inside_another_model_init(model, base):
                counter.enable(model)
            return out

        def enabling_from_pretrained(cls, *args, **kwargs):
            out = from_pretrained(cls, *args, **kwargs)
            model = out[0] if isinstance(out, tuple) else out  # output_loading_info=True returns a tuple
            if isinstance(model, base):
                counter.enable(model)
            return out

        # Not counted while torch.compile traces: a counter in the graph would make every call recompile it.
        def counted_topk_gating(logits, *args, **kwargs):
            if not torch.compiler.is_compiling():
                counter.current["router_calls"] += logits.shape[0] > 0
            return topk_gating(logits, *args, **kwargs)

        def counted_run_validated(hidden, *args, **kwargs):
            if not torch.compiler.is_compiling():
                counter.current["experts_calls"] += hidden.shape[0] > 0
            return run_validated(hidden, *args, **kwargs)

        base.post_init = enabling_post_init
        base.from_pretrained = classmethod(enabling_from_pretrained)
        hf.topk_gating = counted_topk_gating
        hf.run_validated = counted_run_validated

    def enable(self, model) -> None:
        if any(p.is_meta for p in model.parameters()):
            return  # built on the meta device: from_pretrained enables it once its weights are loaded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tests check warnings of their own
            report = self.hf.enable(model)
        self.current["enabled_models"] += 1
        self.current["routers_patched"] += len(report.routers)
        self.current["experts_patched"] += len(report.experts)
        self.skip_reasons.update(report.skipped.values())

    def pytest_runtest_setup(self, item):
        self.current.clear()

    def pytest_runtest_logreport(self, report):
        entry = self.tests.setdefault(report.nodeid, {"outcome": "passed"})
        if report.failed:
            entry["outcome"] = "failed"
        # a subtest's skip (pytest's SubtestReport, or pytest-subtests' before pytest 9) leaves its test running
        elif report.skipped and type(report).__name__ != "SubtestReport" and entry["outcome"] != "failed":
            entry["outcome"] = "skipped"
        entry.update({k: self.current[k] for k in COUNTS})

    def summary(self) -> dict:
        totals = {k: sum(t[k] for t in self.tests.values()) for k in COUNTS}
        outcomes = collections.Counter(t["outcome"] for t in self.tests.values())
        return {"tests_run": len(self.tests), **outcomes, **(totals if self.enabled else {})}

    def pytest_sessionfinish(self, session):
        path = os.environ.get("NETMERGE_HF_RESULTS")
        if path:
            with open(path, "w") as f:
                results = {"summary": self.summary(), "skipped_modules": dict(self.skip_reasons), "tests": self.tests}
                json.dump(results, f, indent=1)

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_line(f"netmerge-fast: {self.summary()}")
        for why, n in self.skip_reasons.most_common():
            terminalreporter.write_line(f"netmerge-fast left a module on transformers' code x{n}: {why}")


def _inside_another_model_init(model, base) -> bool:
    """True while the ``__init__`` of another transformers model is on the stack (model is one of its parts)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            owner = frame.f_locals.get("self")
            if owner is not model and isinstance(owner, base):
                return True
        frame = frame.f_back
    return False


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    config.pluginmanager.register(OutcomeRecorder(os.environ.get("NETMERGE_HF_ENABLE") == "1"), "netmerge_hf_recorder")
