"""The command line under bad input: one line naming the argument, exit status 2, nothing lost."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pedaPEFT import __main__ as cli
from pedaPEFT import corpus, data, experiments, gpt


def run_cli(argv, capsys):
    """Exit status and stderr of ``python -m pedaPEFT argv``, run in this process."""
    try:
        status = cli.main(argv)
    except SystemExit as stop:
        status = stop.code
    return status, capsys.readouterr().err


def assert_user_error(argv, capsys, *names):
    status, err = run_cli(argv, capsys)
    assert status == 2, (argv, status, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, (name, err)


def test_cli_constants_agree_with_the_package():
    assert set(cli.TASKS) == set(data.TASKS)
    assert set(cli.TEXT_DOMAINS) == set(corpus.DOMAINS)
    assert set(cli.PRESETS) == set(gpt.PRESETS)
    assert cli.SHIPPED_BASES == sorted(p.stem for p in gpt.PRETRAINED_DIR.glob("*.safetensors"))


@pytest.mark.parametrize(
    "argv, names",
    [
        (["finetune", "--task", "shift", "--steps", "0"], ["--steps", ">= 1"]),
        (["finetune", "--task", "shift", "--steps", "-5"], ["--steps"]),
        (["finetune", "--task", "shift", "--lr", "0"], ["--lr", "> 0"]),
        (["finetune", "--task", "shift", "--lr", "inf"], ["--lr", "finite"]),
        (["finetune", "--task", "shift", "--lr", "nan"], ["--lr"]),
        (["finetune", "--task", "shift", "--method", "lora", "--targets", "ln_1"],
         ["--targets", "q, k, v, o, fc, proj"]),
        (["finetune", "--task", "shift", "--threads", "0"], ["--threads"]),
        (["finetune", "--task", "shift", "--lora-dropout", "1"], ["--lora-dropout", "[0, 1)"]),
        (["finetune", "--task", "nope"], ["--task", "shift"]),
        (["finetune", "--task", "shift", "--method", "magic"], ["--method", "qlora"]),
        (["finetune", "--task", "shift", "--base", "gpt3"], ["--base", "tiny"]),
        (["finetune", "--task", "shift", "--quant-type", "int4"], ["--quant-type", "nf4"]),
        (["pretrain", "--steps", "0"], ["--steps"]),
        (["pretrain", "--preset", "huge"], ["--preset", "tiny"]),
        (["pretrain", "--resume"], ["--resume", "--checkpoint"]),
        (["figures", "nope"], ["nope", "svd_photo_spectrum"]),
        (["demo", "--task", "unknown"], ["--task", "reverse"]),
        (["lora-experiment", "tables", "--task", "unknown"], ["--task"]),
        (["qlora-experiment", "--task", "unknown"], ["--task"]),
        (["nonsense"], ["nonsense"]),
    ],
)
def test_user_errors_are_one_line_with_status_2(argv, names, capsys):
    assert_user_error(argv, capsys, *names)


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_user_error(["finetune", "--task", "shift", "--checkpoint", str(tmp_path)], capsys,
                      "--checkpoint", "folder")
    assert_user_error(["pretrain", "--out", str(a_file)], capsys, "--out", "is a file")
    assert_user_error(["figures", "--out", str(a_file / "sub")], capsys, "--out")
    assert_user_error(["demo", "--out", str(a_file)], capsys, "--out")
    assert_user_error(["qlora-experiment", "--out", str(tmp_path)], capsys, "--out")


def test_pretrain_never_replaces_existing_weights_without_force(tmp_path, capsys):
    shipped = gpt.pretrained_paths("tiny")[0].read_bytes()
    # The shipped folder, named explicitly, still needs --force.
    assert_user_error(["pretrain", "--out", str(gpt.PRETRAINED_DIR), "--steps", "1"], capsys,
                      "--out", "--force")
    (tmp_path / "tiny.json").write_text("{}")
    assert_user_error(["pretrain", "--out", str(tmp_path), "--steps", "1"], capsys, "--force")
    assert (tmp_path / "tiny.json").read_text() == "{}"
    assert gpt.pretrained_paths("tiny")[0].read_bytes() == shipped
    assert cli.build_parser().parse_args(["pretrain"]).out == "runs"


def test_load_results_names_the_real_command():
    with pytest.raises(ValueError, match="python -m pedaPEFT lora-experiment nothing"):
        experiments.load_results("lora_nothing")
    with pytest.raises(ValueError, match="qlora-experiment --scale full --task swap"):
        experiments.load_results("qlora_table3_swap")
    with pytest.raises(ValueError, match="qlora-experiment --rows qv --scale full --task swap"):
        experiments.load_results("qlora_qv_swap")


def test_env_checks_what_lessons_needs():
    from pedaPEFT import envcheck

    names = {check.name for check in envcheck.run_checks()}
    assert {"jupytext", "nbformat", "nbclient", "nbval", "jupyter kernel"} <= names


NUMERIC_OPTIONS = ["--steps", "--lr", "--threads", "--r", "--alpha", "--n-train",
                   "--bottleneck", "--lora-dropout"]
bad_numbers = st.one_of(
    st.sampled_from(["0", "-1", "-0.5", "nan", "inf", "-inf", "", "1e999", "x", "0x10", "1,5"]),
    st.integers(max_value=0).map(str),
    st.floats(allow_nan=True, allow_infinity=True).filter(
        lambda v: not (math.isfinite(v) and v > 0)).map(repr),
)


FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
@given(option=st.sampled_from(NUMERIC_OPTIONS), value=bad_numbers)
def test_random_bad_numbers_are_refused_by_name(option, value, capsys):
    if option == "--lora-dropout":
        try:
            if 0 <= float(value) < 1:
                return
        except ValueError:
            pass
    assert_user_error(["finetune", "--task", "shift", option, value], capsys, option)


@settings(max_examples=25, deadline=None, suppress_health_check=FIXTURE_OK)
@given(word=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                    max_size=8).filter(lambda w: w not in (*data.TASKS, *cli.TEXT_DOMAINS)
                                       and not w.startswith("-")))
def test_random_bad_choices_are_refused_by_name(word, capsys):
    for argv, option in (
        (["finetune", "--task", word], "--task"),
        (["finetune", "--task", "shift", "--method", word], "--method"),
        (["pretrain", "--preset", word], "--preset"),
        (["finetune", "--task", "shift", "--targets", word], "--targets"),
    ):
        if option == "--targets" and all(
            name.strip() in cli.LINEAR_NAMES for name in word.split(",") if name.strip()
        ) and any(name.strip() for name in word.split(",")):
            continue
        if option == "--method" and word in cli.METHODS:
            continue
        if option == "--preset" and word in cli.PRESETS:
            continue
        assert_user_error(argv, capsys, option)


def test_lessons_without_its_dependencies_names_the_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def without_jupytext(name, *args, **kwargs):
        if name == "jupytext" or (name == "pedaPEFT" and "notebooks" in (args[2] or ())):
            raise ModuleNotFoundError("No module named 'jupytext'", name="jupytext")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_jupytext)
    assert_user_error(["lessons", "--check"], capsys, "jupytext", "pip install")
