"""PagedAdamW on a real CUDA device: torch AdamW's update, pinned host states, the budget held."""

import gc
import io

import pytest
import torch
from torch import nn

from pedaPEFT.paged import PagedAdamW, state_bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def model(seed: int = 0, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                         nn.Linear(width, 8)).to(CUDA)


def total_state_bytes(module: nn.Module) -> int:
    return sum(state_bytes(param) for param in module.parameters())


def train(module: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator(device=CUDA).manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, device=CUDA, generator=generator)
        y = torch.randn(32, 8, device=CUDA, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(module(x), y).backward()
        optimizer.step()


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("fraction", [2.0, 0.5, 0.1])
@pytest.mark.parametrize("foreach", [True, False])
def test_equals_torch_adamw_on_cuda(fraction, foreach):
    reference, paged = model(), model()
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1,
                                 foreach=foreach)
    optimizer = PagedAdamW(paged.parameters(), lr=1e-2, weight_decay=0.1,
                           budget_bytes=int(fraction * total_state_bytes(paged)))
    train(reference, expected, steps=8)
    train(paged, optimizer, steps=8)
    torch.cuda.synchronize()
    assert_same_parameters(reference, paged)
    assert not optimizer.simulated and (optimizer.stats.host_bytes > 0) == (fraction < 1)


def test_many_small_pages_race_free():
    # a 4 KiB page over a 1M-element weight: hundreds of overlapping copies per step
    reference, paged = model(width=1024), model(width=1024)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    optimizer = PagedAdamW(paged.parameters(), lr=1e-3, budget_bytes=4 * 4096 + 1,
                           page_bytes=4096)
    train(reference, expected, steps=5)
    train(paged, optimizer, steps=5)
    torch.cuda.synchronize()
    assert_same_parameters(reference, paged)
    assert optimizer.stats.pages_in > 5 * 500


def test_evicted_states_are_pinned_host_memory_and_resident_ones_on_the_gpu():
    module = model()
    optimizer = PagedAdamW(module.parameters(), budget_bytes=total_state_bytes(module) // 3)
    train(module, optimizer, steps=1)
    evicted = set(optimizer.stats.evicted_params)
    assert evicted
    for index, param in enumerate(module.parameters()):
        moment = optimizer.state[param]["exp_avg_sq"]
        if index in evicted:
            assert moment.device.type == "cpu" and moment.is_pinned()
        else:
            assert moment.device == param.device


def state_growth(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes the optimizer's steps add to the device after a warm-up step made the gradients."""
    train(module, torch.optim.SGD(module.parameters(), lr=0.0), steps=1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    train(module, optimizer, steps=3)
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def test_device_memory_of_the_states_stays_within_the_budget():
    reference = model(width=1024)
    growth = state_growth(reference, torch.optim.AdamW(reference.parameters()))
    assert growth >= total_state_bytes(reference), "unpaged AdamW must hold all its states"
    del reference
    gc.collect()
    torch.cuda.empty_cache()

    module = model(width=1024)
    budget = total_state_bytes(module) // 4
    optimizer = PagedAdamW(module.parameters(), budget_bytes=budget)
    assert state_growth(module, optimizer) <= budget
    assert optimizer.stats.device_bytes <= budget


def test_state_dict_round_trips_exactly_on_cuda():
    uninterrupted, resumed = model(), model()
    budget = total_state_bytes(resumed) // 3
    optimizer = PagedAdamW(uninterrupted.parameters(), budget_bytes=budget)
    train(uninterrupted, optimizer, steps=3)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    train(uninterrupted, optimizer, steps=3, seed=2)

    first = PagedAdamW(resumed.parameters(), budget_bytes=budget)
    train(resumed, first, steps=3)
    buffer.seek(0)
    second = PagedAdamW(resumed.parameters(), budget_bytes=budget // 2)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    train(resumed, second, steps=3, seed=2)
    torch.cuda.synchronize()
    for x, y in zip(uninterrupted.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(x, y)


def test_set_budget_moves_states_and_keeps_the_update():
    reference, paged = model(), model()
    total = total_state_bytes(paged)
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = PagedAdamW(paged.parameters(), lr=1e-2, budget_bytes=total)
    train(reference, expected, steps=2)
    train(paged, optimizer, steps=2)
    optimizer.set_budget(total // 5)
    train(reference, expected, steps=2, seed=2)
    train(paged, optimizer, steps=2, seed=2)
    optimizer.set_budget(total)
    train(reference, expected, steps=2, seed=3)
    train(paged, optimizer, steps=2, seed=3)
    torch.cuda.synchronize()
    assert optimizer.stats.evictions == optimizer.stats.recalls > 0
    assert_same_parameters(reference, paged)


def test_cpu_parameter_with_a_cuda_budget_is_refused():
    with pytest.raises(ValueError, match=r"params\[0\] is on cpu.*budget is for cuda"):
        PagedAdamW(nn.Linear(2, 2).parameters(), budget_bytes=1000, device="cuda")
