"""The GPU path, checked on the CPU: a plain training step (one that neither logs, evaluates nor saves)
never waits on the device, and the training forward that `--compile` compiles is one graph.

A host-device sync shows in Python as a call that hands a tensor's value to Python: `.item()`, `.tolist()`,
`bool(t)`, `int(t)`, `float(t)`, `.cpu()`, `.numpy()`. We count those calls made from the model file's own
lines during two short runs that differ only in their number of plain steps: equal counts mean that plain
steps make none. (Library calls are left out: with fused optimizers they stay on the device.)
"""
import collections
import importlib
import sys

import pytest
import torch

from test_faults import SCRIPTS, args, vq  # noqa: F401 (vq is a fixture)

SYNCS = ["item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"]


def syncs_of_a_run(mod, argv, monkeypatch):
    """Counter of (method, line) for the sync calls made from mod's file during mod.train(argv)."""
    calls = collections.Counter()
    with monkeypatch.context() as m:
        for name in SYNCS:
            real = getattr(torch.Tensor, name)
            def spy(self, *a, _real=real, _name=name, **k):
                caller = sys._getframe(1).f_code.co_filename
                if caller == mod.__file__:
                    calls[(_name, sys._getframe(1).f_lineno)] += 1
                return _real(self, *a, **k)
            m.setattr(torch.Tensor, name, spy)
        mod.train(mod.parse_args([str(a) for a in argv]))
    return calls


@pytest.mark.parametrize("script", SCRIPTS)
def test_plain_training_steps_never_sync_with_the_device(script, data_dir, tmp_path, vq, monkeypatch):
    mod = importlib.import_module(script[:-3])
    codes = vq / "codes.pt"
    def run(steps):  # only the last step logs, evaluates and saves
        out = tmp_path / f"run{steps}"
        argv = args(script, data_dir, out, steps=steps, codes=codes)
        return syncs_of_a_run(mod, [*argv, "--log_every", 1000, "--eval_every", 1000], monkeypatch)
    short, long = run(3), run(9)
    assert sum(short.values()) > 0  # the spy sees the final step's syncs
    extra = {k: long[k] - short[k] for k in long if long[k] != short[k]}
    assert not extra, f"(method, line of {script}): syncs added by 6 plain steps: {extra}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_compiled_training_forward_has_no_graph_break(script, data_dir, tmp_path, vq, monkeypatch):
    mod = importlib.import_module(script[:-3])
    real = torch.compile
    def one_graph(model, **kw):  # fullgraph: a graph break is an error; "eager": trace only, no C++ build
        return real(model, fullgraph=True, backend="eager")
    monkeypatch.setattr(torch, "compile", one_graph)
    argv = args(script, data_dir, tmp_path / "o", "--compile", steps=3, codes=vq / "codes.pt")
    res = mod.train(mod.parse_args([str(a) for a in argv]))
    assert res["steps"] == 3
