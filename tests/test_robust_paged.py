"""PagedAdamW under bad input: torch.optim.AdamW's checks, duplicates, hostile state dicts,
and a warning for pages too small to be worth paging."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pedaPEFT.paged import MIN_SENSIBLE_PAGE_BYTES, PagedAdamW


def params():
    torch.manual_seed(0)
    return list(nn.Linear(4, 3).parameters())


non_finite = st.sampled_from([math.nan, math.inf, -math.inf])


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(["lr", "eps", "weight_decay", "beta"]),
       value=st.one_of(non_finite, st.floats(max_value=-1e-12), st.just(True)))
def test_hyperparameters_checked_as_torch_and_finite(name, value):
    kwargs = {"betas": (value, 0.999)} if name == "beta" else {name: value}
    with pytest.raises(ValueError, match=name):
        PagedAdamW(params(), budget_bytes=1000, **kwargs)
    if not (name == "beta" or isinstance(value, bool) or math.isnan(value)
            or math.isinf(value)):  # torch refuses the negative values too
        with pytest.raises(ValueError):
            torch.optim.AdamW(params(), **kwargs)


def test_a_parameter_listed_twice_is_refused():
    weight, bias = params()
    with pytest.raises(ValueError, match="appears twice"):
        PagedAdamW([weight, bias, weight], budget_bytes=1000)
    with pytest.raises(ValueError, match="appears twice"):
        PagedAdamW([{"params": [weight]}, {"params": [weight, bias]}], budget_bytes=1000)
    with pytest.raises(ValueError, match="param group: lr"):
        PagedAdamW([{"params": [weight], "lr": math.nan}], budget_bytes=1000)


def saved_state():
    model = nn.Linear(4, 3)
    optimizer = PagedAdamW(model.parameters(), budget_bytes=1000)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer, optimizer.state_dict()


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s["state"].update({"0": s["state"].pop(0)}), "unknown keys"),
    (lambda s: s["param_groups"][0].update(lr=-1.0), r"param_groups\[0\]: lr"),
    (lambda s: s["param_groups"][0].update(eps=math.nan), r"param_groups\[0\]: eps"),
    (lambda s: s["param_groups"][0].pop("betas"), "lacks"),
    (lambda s: s["state"][0].update(step=torch.tensor(-3.0)), "'step'"),
    (lambda s: s["state"][1].update(exp_avg="x"), "'exp_avg'"),
    (lambda s: s.update(state=[]), "'state'"),
])
def test_a_hostile_state_dict_is_refused_and_changes_nothing(corrupt, message):
    model, optimizer, state = saved_state()
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    lr_before = optimizer.param_groups[0]["lr"]
    hostile = {**state, "state": {k: dict(v) for k, v in state["state"].items()},
               "param_groups": [dict(g) for g in state["param_groups"]]}
    corrupt(hostile)
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(hostile)
    assert optimizer.param_groups[0]["lr"] == lr_before
    for param, values in before.items():
        assert all(torch.equal(values[k], optimizer.state[param][k]) for k in values)


def test_tiny_automatic_pages_warn_and_explicit_pages_do_not():
    big = [nn.Parameter(torch.zeros(20_000))]
    with pytest.warns(UserWarning, match=f"below {MIN_SENSIBLE_PAGE_BYTES}: paging is very slow"):
        PagedAdamW(big, budget_bytes=256 * 32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PagedAdamW(big, budget_bytes=4 * 4096, page_bytes=4096)
