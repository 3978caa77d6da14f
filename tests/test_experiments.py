"""The experiment definitions of lessons 4, 5 and 9: budgets, summaries, result files."""

import json

import pytest

from pedaPEFT import experiments, gpt, lora


def test_table5_settings_share_one_budget():
    config = gpt.GPTConfig.preset("tiny")
    budgets = set()
    for table, options in experiments.lora_table_settings():
        if table != "table5":
            continue
        model = gpt.GPT(config)
        lora.prepare_lora(model, **options)
        budgets.add(lora.count_parameters(model)[0])
    expected = experiments.BUDGET_RANK * config.n_layer * 2 * config.n_embd
    assert budgets == {expected}


def test_table6_covers_every_rank_and_target_set():
    pairs = {
        (tuple(o["targets"]), o["r"]) for t, o in experiments.lora_table_settings() if t == "table6"
    }
    expected = {(t, r) for t in experiments.TABLE6 for r in experiments.RANKS}
    assert pairs == expected | set(experiments.TABLE6_EXTRA)


def test_summarize_mean_and_sample_std():
    rows = [
        {
            "group": "g",
            "method": "lora",
            "options": {"r": 1},
            "seed": s,
            "trainable": 5,
            "total": 50,
            "accuracy": a,
        }
        for s, a in enumerate((0.5, 0.7, 0.9))
    ]
    rows.append(
        {
            "group": "h",
            "method": "full",
            "options": {},
            "seed": 0,
            "trainable": 50,
            "total": 50,
            "accuracy": 1.0,
        }
    )
    (entry,) = experiments.summarize(rows, "g")
    assert entry["n"] == 3 and entry["trainable"] == 5
    assert entry["mean"] == pytest.approx(0.7)
    assert entry["std"] == pytest.approx(0.2)
    assert [e["method"] for e in experiments.summarize(rows)] == ["lora", "full"]


def test_summarize_keeps_labels_apart_and_the_fields_seeds_share():
    row = {"label": "a", "method": "qlora", "options": {}, "trainable": 3, "seed": 0,
           "model_bytes_after": 7, "accuracy": 0.25, "curve": [[1, 0.25]]}
    rows = [row, {**row, "seed": 1, "accuracy": 0.75}, {**row, "label": "b", "accuracy": 1.0}]
    first, second = experiments.summarize(rows)
    assert (first["label"], first["n"], first["mean"], second["label"]) == ("a", 2, 0.5, "b")
    assert "seed" not in first and "curve" not in first and first["model_bytes_after"] == 7


@pytest.mark.parametrize("name", ["lora_adapters", "lora_adapters_reverse", "lora_tables",
                                  "lora_tables_reverse", "qlora_table3_reverse",
                                  "qlora_table3_shift", "qlora_qv_reverse", "qlora_qv_shift"])
def test_committed_results_load_and_summarize(name):
    results = experiments.load_results(name)
    assert experiments.results_path(name).name == f"{name}.json"
    summary = experiments.summarize(results["runs"])
    assert sum(s["n"] for s in summary) == len(results["runs"])
    assert all(0.0 <= s["mean"] <= 1.0 for s in summary)


def test_missing_results_name_the_commands_that_write_them():
    with pytest.raises(ValueError, match="lora-experiment nothing --scale full --out "):
        experiments.load_results("lora_nothing")


def test_write_results_is_atomic_json(tmp_path):
    path = experiments.write_results({"b": 1, "a": [1, 2]}, tmp_path / "x" / "r.json")
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_bad_names():
    with pytest.raises(ValueError, match="name must be one of"):
        experiments.experiment("table7")
    with pytest.raises(ValueError, match="name must be one of.*qlora_table3"):
        experiments.experiment("table4")
    with pytest.raises(ValueError, match="scale must be one of"):
        experiments.experiment("tables", "huge")
    with pytest.raises(ValueError, match="method must be one of"):
        experiments.run("no-such-method", "shift", 0, experiments.SCALES["small"])


def test_alpha_over_r_keeps_update_size_closer_than_no_scaling():
    results = experiments.alpha_scaling(
        ranks=(1, 16), sweep_ranks=(1,), lrs=(1e-3,), norm_steps=5, sweep_steps=1
    )
    growth = {rule: values[1] / values[0] for rule, values in results["norms"].items()}
    assert growth["none"] > 2 * growth["alpha/r"]


def test_qlora_qv_searches_each_row_and_runs_it_at_its_own_rate(monkeypatch):
    calls = []

    def fake_run(method, task, seed, scale, options=None, lr=3e-3, validation=False):
        """Pretend LoRA learns from lr 1e-2 on and QLoRA from 3e-2 on."""
        calls.append((method, seed, lr, validation))
        learns = lr >= (1e-2 if method == "lora" else 3e-2)
        return {"method": method, "options": {k: list(v) if isinstance(v, tuple) else v
                                              for k, v in options.items()},
                "seed": seed, "lr": lr, "accuracy": float(learns)}

    monkeypatch.setattr(experiments, "run", fake_run)
    results = experiments.experiment("qlora_qv", "full")
    assert results["task"] == "reverse" and results["lr"] == {"lora": 1e-2, "qlora": 3e-2}
    assert results["lr_search"]["lora"] == {"0.001": 0.0, "0.003": 0.0, "0.01": 1.0, "0.03": 1.0}
    searched = [(m, lr) for m, seed, lr, validation in calls if validation]
    assert searched == [(m, lr) for m in ("lora", "qlora") for lr in experiments.LR_GRID]
    assert all(seed == 0 for _, seed, _, validation in calls if validation)
    labels = [row["label"] for row in experiments.summarize(results["runs"])]
    assert labels == list(experiments.TABLE3_QV_LABELS)
    seeds = experiments.SCALES["full"].seeds
    assert len(results["runs"]) == 2 * len(seeds)
    for row in results["runs"]:
        assert row["lr"] == results["lr"][row["method"]] and row["accuracy"] == 1.0
        assert row["options"]["targets"] == ["q", "v"]
