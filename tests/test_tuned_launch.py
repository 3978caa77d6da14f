"""tuned_launch: tune once, compile once, then launch the compiled kernel for the same
specialization only (stand-in kernel objects record what each call went through)."""

import pytest
import torch

from pedaPEFT import tuned_launch


class _Compiled:
    def __init__(self, log, config):
        self.log, self.config = log, config

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("direct", grid, args))


class _Jit:
    arg_names = ["x_ptr", "n", "SIZE", "BLOCK"]

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log, kwargs)
        return run


class _Config:
    def all_kwargs(self):
        return {"BLOCK": 4, "num_warps": 4}


class _Autotuned:
    def __init__(self):
        self.log = []
        self.fn = _Jit(self.log)
        self.best_config = _Config()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(("autotune", args, kwargs))


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    monkeypatch.setattr(tuned_launch, "_TUNED", {})
    monkeypatch.setattr(tuned_launch, "_COMPILED", {})
    monkeypatch.setattr(tuned_launch, "_passes_constexprs", lambda: True)


def _grid(meta):
    return (10 // meta["BLOCK"] + 1,)


def test_tunes_then_compiles_then_launches_directly():
    kernel = _Autotuned()
    x = torch.zeros(64)
    for _ in range(4):
        tuned_launch.launch(kernel, _grid, (x, 64), {"SIZE": 8}, key=("k", 64))
    kinds = [entry[0] for entry in kernel.log]
    assert kinds == ["autotune", "jit", "direct", "direct"]
    _, grid, args = kernel.log[2]
    assert grid == (3, 1, 1)  # the tuned BLOCK = 4 gives the grid, padded to three axes
    assert args == (x, 64, 8, 4)  # runtime values, then the constexprs in signature order


def test_another_alignment_or_dtype_or_key_goes_through_the_jit_again():
    kernel = _Autotuned()
    storage = torch.zeros(65)
    aligned, misaligned = storage[:64], storage[1:]
    for x in (aligned, aligned, misaligned, misaligned.double()):
        tuned_launch.launch(kernel, _grid, (x, 64), {"SIZE": 8}, key=("k", 64))
    assert [entry[0] for entry in kernel.log] == ["autotune", "jit", "jit", "jit"]
    tuned_launch.launch(kernel, _grid, (aligned, 64), {"SIZE": 8}, key=("k", 64))
    assert kernel.log[-1][0] == "direct"
    tuned_launch.launch(kernel, _grid, (aligned, 32), {"SIZE": 8}, key=("k", 32))
    assert kernel.log[-1][0] == "autotune"  # a new key is tuned on its own


def test_without_a_compiled_kernel_to_call_every_launch_uses_the_jit(monkeypatch):
    monkeypatch.setattr(tuned_launch, "_passes_constexprs", lambda: False)
    kernel = _Autotuned()
    x = torch.zeros(64)
    for _ in range(3):
        tuned_launch.launch(kernel, _grid, (x, 64), {"SIZE": 8}, key=("k", 64))
    assert [entry[0] for entry in kernel.log] == ["autotune", "jit", "jit"]


def test_the_launcher_it_returns_launches_the_same_binary_directly():
    kernel = _Autotuned()
    x, y = torch.zeros(64), torch.ones(64)
    returned = [tuned_launch.launch(kernel, _grid, (x, 64), {"SIZE": 8}, key=("k", 64))
                for _ in range(3)]
    assert returned[0] is None  # tuning
    assert returned[1] is not None and returned[2] is returned[1]
    returned[1](y, 64)
    assert kernel.log[-1] == ("direct", (3, 1, 1), (y, 64, 8, 4))


def test_no_launcher_where_triton_cannot_launch_a_compiled_binary(monkeypatch):
    monkeypatch.setattr(tuned_launch, "_passes_constexprs", lambda: False)
    kernel = _Autotuned()
    x = torch.zeros(64)
    assert all(tuned_launch.launch(kernel, _grid, (x, 64), {"SIZE": 8}, key=("k", 64)) is None
               for _ in range(3))
