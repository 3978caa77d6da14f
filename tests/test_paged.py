"""PagedAdamW on the simulated CPU device: torch AdamW's update, paging, saving, bad input."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pedaPEFT.paged import PagedAdamW, adamw_update, state_bytes
from pedaPEFT.simulated_device import (
    DeviceOutOfMemoryError,
    activation_bytes,
    train_on_simulated_device,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids waiting on busy cores of a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 32), nn.GELU(),
                         nn.Linear(32, 5))


def total_state_bytes(module: nn.Module) -> int:
    return sum(state_bytes(param) for param in module.parameters())


def train(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1,
          skip: str | None = None) -> None:
    """A few regression steps; parameters whose name starts with ``skip`` get no gradient."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 20, generator=generator)
        y = torch.randn(8, 5, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(module(x), y).backward()
        if skip is not None:
            for name, param in module.named_parameters():
                if name.startswith(skip):
                    param.grad = None
        optimizer.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------- the update


@pytest.mark.parametrize("fraction", [2.0, 0.5, 0.2])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adamw_bit_for_bit(fraction, weight_decay):
    reference, paged = model(), model()
    budget = int(fraction * total_state_bytes(paged))
    expected = torch.optim.AdamW(reference.parameters(), lr=3e-2, betas=(0.8, 0.95),
                                 eps=1e-6, weight_decay=weight_decay)
    optimizer = PagedAdamW(paged.parameters(), lr=3e-2, betas=(0.8, 0.95), eps=1e-6,
                           weight_decay=weight_decay, budget_bytes=budget)
    train(reference, expected, steps=6)
    train(paged, optimizer, steps=6)
    assert_same_parameters(reference, paged)
    for p, q in zip(reference.parameters(), paged.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(expected.state[p][key], optimizer.state[q][key]), key
    assert (optimizer.stats.host_bytes > 0) == (fraction < 1)


def test_defaults_match_torch_adamw():
    paged = PagedAdamW(model().parameters(), budget_bytes=1 << 20)
    reference = torch.optim.AdamW(model().parameters())
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert paged.defaults[key] == reference.defaults[key], key
    assert reference.defaults["amsgrad"] is False


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.05, 1.5), page_elements=st.integers(2, 300),
       seed=st.integers(0, 1000))
def test_any_budget_and_page_size_gives_torch_adamw(fraction, page_elements, seed):
    reference, paged = model(seed), model(seed)
    budget = max(int(fraction * total_state_bytes(paged)), 4 * 8 * page_elements)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = PagedAdamW(paged.parameters(), lr=1e-2, budget_bytes=budget,
                           page_bytes=8 * page_elements)
    train(reference, expected, steps=3, seed=seed)
    train(paged, optimizer, steps=3, seed=seed)
    assert_same_parameters(reference, paged)
    assert optimizer.stats.device_bytes <= budget


def test_parameter_groups_and_missing_gradients_follow_torch():
    reference, paged = model(), model()

    def groups(module):
        layers = list(module.children())
        return [{"params": layers[0].parameters(), "lr": 1e-1},
                {"params": [*layers[2].parameters(), *layers[4].parameters()],
                 "weight_decay": 0.5}]

    expected = torch.optim.AdamW(groups(reference), lr=1e-2)
    optimizer = PagedAdamW(groups(paged), lr=1e-2, budget_bytes=total_state_bytes(paged) // 3)
    train(reference, expected, steps=3)
    train(paged, optimizer, steps=3)
    train(reference, expected, steps=2, seed=2, skip="2.")  # layer 2 gets no gradient
    train(paged, optimizer, steps=2, seed=2, skip="2.")
    assert_same_parameters(reference, paged)
    weight = list(paged.parameters())[2]
    assert optimizer.state[weight]["step"].item() == 3


def test_closure_is_called_and_its_loss_returned():
    module = model()
    optimizer = PagedAdamW(module.parameters(), budget_bytes=1000)
    x, y = torch.randn(4, 20), torch.randn(4, 5)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(module(x), y)
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    assert loss is not None and math.isfinite(loss.item())
    assert optimizer.stats.pages_in > 0


def test_adamw_update_first_step_moves_each_weight_by_lr():
    # at t = 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + ε) ≈ lr · sign(g)
    param = torch.tensor([1.0, -2.0, 3.0])
    grad = torch.tensor([0.5, -4.0, 1e-3])
    m, v = torch.zeros(3), torch.zeros(3)
    adamw_update([param], [grad], [m], [v], [1.0], lr=0.1, beta1=0.9, beta2=0.999,
                 eps=1e-12, weight_decay=0.0)
    torch.testing.assert_close(param, torch.tensor([0.9, -1.9, 2.9]))
    torch.testing.assert_close(m, 0.1 * grad)
    torch.testing.assert_close(v, 0.001 * grad**2)


# ---------------------------------------------------------------- paging


def test_nothing_is_evicted_while_the_states_fit():
    module = model()
    optimizer = PagedAdamW(module.parameters(), budget_bytes=total_state_bytes(module))
    train(module, optimizer, steps=3)
    stats = optimizer.stats
    assert stats.host_bytes == 0 and stats.staging_bytes == 0 and stats.evicted_params == []
    assert stats.pages_in == stats.pages_out == 0
    assert stats.device_bytes == total_state_bytes(module)


def test_pages_and_bytes_moved_per_step_are_counted():
    module = model()
    params = list(module.parameters())
    page_bytes = 256
    optimizer = PagedAdamW(module.parameters(), budget_bytes=4 * page_bytes + 1,
                           page_bytes=page_bytes)
    steps = 3
    train(module, optimizer, steps=steps)
    stats = optimizer.stats
    assert stats.resident_bytes == 0 and stats.evicted_params == list(range(len(params)))
    pages = sum(math.ceil(p.numel() * 4 / page_bytes) for p in params)
    assert stats.pages_in == stats.pages_out == steps * pages
    assert stats.bytes_in == stats.bytes_out == steps * total_state_bytes(module)
    assert stats.staging_bytes == 4 * page_bytes and stats.device_bytes <= stats.budget_bytes


def test_first_fit_keeps_what_fits_and_evicts_the_rest():
    module = model()
    sizes = [state_bytes(p) for p in module.parameters()]
    budget = 4 * 64 + sizes[0] + sizes[1]  # page buffers, then room for the first layer only
    optimizer = PagedAdamW(module.parameters(), budget_bytes=budget, page_bytes=64)
    assert optimizer.stats.resident_bytes + optimizer.stats.staging_bytes <= budget
    evicted = optimizer.stats.evicted_params
    assert 0 not in evicted and 1 not in evicted and 2 in evicted
    assert optimizer.stats.host_bytes == sum(sizes[i] for i in evicted)


def test_evicted_states_live_outside_the_device_budget_store():
    module = model()
    optimizer = PagedAdamW(module.parameters(), budget_bytes=total_state_bytes(module) // 4)
    train(module, optimizer, steps=1)
    params = list(module.parameters())
    assert optimizer.simulated
    staging = optimizer._staging
    assert staging is not None and staging.numel() == optimizer.stats.staging_bytes
    for index in optimizer.stats.evicted_params:
        moment = optimizer.state[params[index]]["exp_avg"]
        assert moment.untyped_storage().data_ptr() != staging.untyped_storage().data_ptr()
        assert moment.shape == params[index].shape


def test_set_budget_evicts_and_recalls_without_changing_the_result():
    reference, paged = model(), model()
    total = total_state_bytes(paged)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = PagedAdamW(paged.parameters(), lr=1e-2, budget_bytes=total)
    train(reference, expected, steps=2)
    train(paged, optimizer, steps=2)
    optimizer.set_budget(total // 5)  # a memory spike: make room on the device
    assert optimizer.stats.evictions == len(optimizer.stats.evicted_params) > 0
    assert optimizer.stats.device_bytes <= total // 5
    train(reference, expected, steps=2, seed=3)
    train(paged, optimizer, steps=2, seed=3)
    optimizer.set_budget(total)  # the spike is over
    assert optimizer.stats.recalls == optimizer.stats.evictions
    assert optimizer.stats.evicted_params == [] and optimizer.stats.staging_bytes == 0
    train(reference, expected, steps=2, seed=4)
    train(paged, optimizer, steps=2, seed=4)
    assert_same_parameters(reference, paged)


# ---------------------------------------------------------------- saving


def test_state_dict_round_trips_exactly_across_budgets():
    uninterrupted, resumed = model(), model()
    budget = total_state_bytes(resumed) // 3
    optimizer = PagedAdamW(uninterrupted.parameters(), lr=1e-2, budget_bytes=budget)
    train(uninterrupted, optimizer, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    train(uninterrupted, optimizer, steps=3, seed=2)

    resumed.load_state_dict(model().state_dict())
    first = PagedAdamW(resumed.parameters(), lr=1e-2, budget_bytes=budget)
    train(resumed, first, steps=3)
    buffer.seek(0)
    # a different budget: the same states, placed differently
    second = PagedAdamW(resumed.parameters(), lr=0.5, budget_bytes=10 * budget)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.param_groups[0]["lr"] == 1e-2
    train(resumed, second, steps=3, seed=2)
    assert_same_parameters(uninterrupted, resumed)
    saved, loaded = optimizer.state_dict(), second.state_dict()
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("budget", [0, -1, 1.5, True, None])
def test_budget_must_be_a_positive_integer(budget):
    with pytest.raises(ValueError, match="budget_bytes"):
        PagedAdamW(model().parameters(), budget_bytes=budget)
    optimizer = PagedAdamW(model().parameters(), budget_bytes=1000)
    with pytest.raises(ValueError, match="budget_bytes"):
        optimizer.set_budget(budget)


def test_parameter_on_another_device_than_the_budget():
    on_meta = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"params\[1\] is on meta.*budget is for cpu"):
        PagedAdamW([nn.Parameter(torch.zeros(3)), on_meta], budget_bytes=1000)
    with pytest.raises(ValueError, match=r"params\[0\].*budget is for cpu"):
        PagedAdamW([on_meta], budget_bytes=1000, device="cpu")
    with pytest.raises(ValueError, match="device must be"):
        PagedAdamW([on_meta], budget_bytes=1000)


def test_state_dict_of_another_optimizer_is_refused():
    module = model()
    other = torch.optim.AdamW(module.parameters())
    train(module, other, steps=1)
    optimizer = PagedAdamW(module.parameters(), budget_bytes=1000)
    with pytest.raises(ValueError, match="another optimizer"):
        optimizer.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="number of parameter groups or parameters"):
        PagedAdamW(model().parameters(), budget_bytes=1000).load_state_dict(
            PagedAdamW(nn.Linear(2, 2).parameters(), budget_bytes=1000).state_dict())


def test_other_bad_arguments():
    params = list(model().parameters())
    with pytest.raises(ValueError, match="amsgrad"):
        PagedAdamW(params, budget_bytes=1000, amsgrad=True)
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(params, lr=-1.0, budget_bytes=1000)
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(params, betas=(0.9, 1.0), budget_bytes=1000)
    with pytest.raises(ValueError, match="page_bytes must be a multiple of 8"):
        PagedAdamW(params, budget_bytes=1000, page_bytes=12)
    with pytest.raises(ValueError, match="cannot hold the 4 page buffers"):
        PagedAdamW(params, budget_bytes=1000, page_bytes=512)
    with pytest.raises(TypeError, match="floating point"):
        PagedAdamW([torch.zeros(3, dtype=torch.int64)], budget_bytes=1000)
    with pytest.raises(ValueError, match="contiguous"):
        PagedAdamW([nn.Parameter(torch.zeros(4, 3).T)], budget_bytes=1000)


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(10, 4, sparse=True)
    optimizer = PagedAdamW(embedding.parameters(), budget_bytes=1000)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        optimizer.step()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_budget_without_cuda_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        PagedAdamW(model().parameters(), budget_bytes=1000, device="cuda")


def test_budget_too_small_for_a_default_page():
    with pytest.raises(ValueError, match="too small to page"):
        PagedAdamW(model().parameters(), budget_bytes=200)


# ---------------------------------------------------------------- the simulated device


def mse(module, x, y):
    return nn.functional.mse_loss(module(x), y)


def spiky_batches(sizes):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 20, generator=generator), torch.randn(size, 5, generator=generator))
            for size in sizes]


def test_activation_bytes_counts_saved_tensors_once_and_grows_with_the_batch():
    module = model()
    small, large = (activation_bytes(module, torch.randn(n, 20)) for n in (8, 32))
    assert small > 0 and large == 4 * small  # every saved tensor here has the batch dimension
    # input (8·20) + the outputs of the two hidden Linear layers and of both GELUs, fp32
    assert small == 4 * 8 * (20 + 64 + 64 + 32 + 32)


def test_a_spike_that_kills_plain_adamw_completes_with_paging():
    sizes = [8, 8, 8, 24, 8, 8]
    batches = spiky_batches(sizes)
    plain_model, paged_model, free_model = model(), model(), model()
    weights = sum(p.numel() * 4 for p in plain_model.parameters())
    normal = activation_bytes(plain_model, batches[0][0])
    capacity = 2 * weights + total_state_bytes(plain_model) + normal + normal // 2

    with pytest.raises(DeviceOutOfMemoryError, match="step 3 .batch 24. needs") as failure:
        train_on_simulated_device(plain_model, torch.optim.AdamW(plain_model.parameters()),
                                  batches, mse, capacity)
    assert len(failure.value.records) == 4 and failure.value.records[-1].total > capacity

    optimizer = PagedAdamW(paged_model.parameters(), budget_bytes=capacity)
    records = train_on_simulated_device(paged_model, optimizer, batches, mse, capacity)
    assert [r.batch_size for r in records] == sizes
    assert all(r.total <= capacity for r in records)
    assert records[3].optimizer < records[2].optimizer == total_state_bytes(paged_model)
    assert optimizer.stats.evictions == optimizer.stats.recalls > 0

    free = torch.optim.AdamW(free_model.parameters())
    for x, y in batches:  # the same training without any memory limit
        free.zero_grad()
        mse(free_model, x, y).backward()
        free.step()
    assert_same_parameters(free_model, paged_model)


def test_simulated_device_capacity_must_be_positive():
    module = model()
    with pytest.raises(ValueError, match="capacity_bytes"):
        train_on_simulated_device(module, PagedAdamW(module.parameters(), budget_bytes=1000),
                                  spiky_batches([2]), mse, 0)


def test_a_refused_budget_change_leaves_the_plan_as_it_was():
    module = model()
    total = total_state_bytes(module)
    optimizer = PagedAdamW(module.parameters(), budget_bytes=total // 2)
    before = (optimizer.stats.budget_bytes, list(optimizer.stats.evicted_params))
    with pytest.raises(ValueError, match="too small to page"):
        optimizer.set_budget(100)
    assert (optimizer.stats.budget_bytes, optimizer.stats.evicted_params) == before
    assert optimizer.page_bytes == (total // 2) // 32 // 8 * 8


def test_gpu_benchmark_runs_end_to_end_in_smoke_mode(tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "paged_gpu.py"
    spec = importlib.util.spec_from_file_location("paged_gpu", script)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "paged_gpu", benchmark)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "paged_smoke.md"
    assert benchmark.main(["--smoke", "--out", str(out), "--steps", "2"]) == 0
    table = out.read_text()
    assert "| training step time, PagedAdamW, nothing evicted / torch AdamW |" in table
    assert "after 3 steps, PagedAdamW, half evicted | 0.00e+00 |" in table
    assert "not measured (needs CUDA)" in table


def test_mixed_dtypes_share_the_page_buffers():
    reference, paged_model = model(), model()
    for module in (reference, paged_model):
        module[0].to(torch.bfloat16)
        module[4].to(torch.float64)

    def forward(module, x):
        h = module[1](module[0](x.to(torch.bfloat16)).float())
        h = module[3](module[2](h))
        return module[4](h.double())

    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = PagedAdamW(paged_model.parameters(), lr=1e-2, budget_bytes=4 * 64 + 8,
                           page_bytes=64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(4, 20, generator=generator), torch.randn(4, 5, generator=generator)
        for module, opt in ((reference, expected), (paged_model, optimizer)):
            opt.zero_grad()
            nn.functional.mse_loss(forward(module, x), y.double()).backward()
            opt.step()
    assert optimizer.stats.resident_bytes == 0
    assert_same_parameters(reference, paged_model)
    assert optimizer.state[paged_model[0].weight]["exp_avg"].dtype == torch.bfloat16


class LazySideStream(PagedAdamW):
    """The CUDA path's stream protocol on a CPU, with a side stream as late as CUDA allows.

    Compute runs at once; side-stream copies wait in a queue and run, in order, only when an
    event recorded after them is waited on (or copies are waited for). A missing wait shows
    up as stale pages, so as results that differ from torch's AdamW.
    """

    def __init__(self, *args, **kwargs):
        self.queue, self.done, self.on_side, self.flushes = [], 0, False, 0
        super().__init__(*args, **kwargs)

    @property
    def simulated(self):
        return False

    def _side(self):
        optimizer = self

        class Side:
            def __enter__(self):
                optimizer.on_side = True

            def __exit__(self, *exc):
                optimizer.on_side = False

        return Side()

    def _copy(self, target, source):
        if self.on_side:
            self.queue.append((target, source))
        else:
            target.copy_(source)

    def _record(self):
        return ("side", len(self.queue)) if self.on_side else ("compute", None)

    def _flush(self, upto):
        self.flushes += upto > self.done
        for target, source in self.queue[self.done:upto]:
            target.copy_(source)
        self.done = max(self.done, upto)

    def _wait(self, event):
        if event is not None and event[0] == "side" and not self.on_side:
            self._flush(event[1])

    def _wait_for_copies(self):
        self._flush(len(self.queue))


def test_the_cuda_stream_protocol_is_race_free_with_a_lazy_side_stream():
    reference, lazy = model(), model()
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer = LazySideStream(lazy.parameters(), lr=1e-2, weight_decay=0.1,
                               budget_bytes=total_state_bytes(lazy) // 3, page_bytes=64)
    train(reference, expected, steps=4)
    train(lazy, optimizer, steps=4)
    assert optimizer.stats.pages_in > 100 and optimizer.done < len(optimizer.queue)
    assert_same_parameters(reference, lazy)
    saved = optimizer.state_dict()  # waits for the copies still queued
    assert optimizer.done == len(optimizer.queue)
    for index, param in enumerate(reference.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(expected.state[param][key], saved["state"][index][key])


@settings(max_examples=15, deadline=None)
@given(fractions=st.lists(st.floats(0.05, 1.2), min_size=2, max_size=5))
def test_any_sequence_of_budgets_keeps_torch_adamw_under_the_stream_protocol(fractions):
    reference, lazy = model(), model()
    total = total_state_bytes(lazy)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = LazySideStream(lazy.parameters(), lr=1e-2, budget_bytes=total)
    for step, fraction in enumerate(fractions):
        optimizer.set_budget(max(int(fraction * total), 4096))
        assert optimizer.stats.device_bytes <= optimizer.stats.budget_bytes
        train(reference, expected, steps=1, seed=step)
        train(lazy, optimizer, steps=1, seed=step)
    assert_same_parameters(reference, lazy)
