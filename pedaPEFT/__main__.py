"""The course's command line: ``python -m pedaPEFT <command> [options]``.

Run ``python -m pedaPEFT --help`` for the list of commands, and ``--help`` after a command for
its options.
"""

import argparse
import math
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
TASKS = ("shift", "reverse", "swap")  # pedaPEFT.data.TASKS (a test checks they agree)
TEXT_DOMAINS = ("asyncio",)  # pedaPEFT.corpus.DOMAINS (a test checks they agree)
PRESETS = ("tiny", "small", "gpt2", "pydocs")  # pedaPEFT.gpt.PRESETS (a test checks they agree)
SHIPPED_BASES = sorted(path.stem for path in (Path(__file__).parent / "weights").glob("*.json"))
METHODS = ("full", "top", "feature", "lora", "adapter", "qlora", "bitfit", "prefix")
LINEAR_NAMES = ("q", "k", "v", "o", "fc", "proj")  # every nn.Linear of a GPT block
QUANT_TYPES = ("nf4", "fp4", "int8")


class Parser(argparse.ArgumentParser):
    """An argument parser whose every error is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(convert, accepts, allowed: str):
    """An argparse type: ``convert(text)`` if ``accepts`` it, else an error naming ``allowed``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accepts(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda value: value >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda value: value >= 0, "an integer >= 0")
positive_float = _number(float, lambda value: math.isfinite(value) and value > 0,
                         "a finite number > 0")
probability = _number(float, lambda value: 0 <= value < 1, "a number in [0, 1)")  # e.g. dropout


def target_list(text: str) -> list[str]:
    """Comma-separated names of a GPT block's linear layers (argparse type)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in LINEAR_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated names from {', '.join(LINEAR_NAMES)}, got {text!r}"
        )
    return names


def command_env(args: argparse.Namespace) -> int:
    from pedaPEFT import envcheck

    return envcheck.main()


def command_figures(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from pedaPEFT import figures, files

    unknown = [name for name in args.names if name not in figures.FIGURES]
    if unknown:
        raise ValueError(
            f"names: unknown figure(s) {', '.join(unknown)}; choose from "
            f"{', '.join(sorted(figures.FIGURES))}"
        )
    out = files.check_output_dir(args.out, "--out")
    for path in figures.write_figures(out, args.names or None):
        print(f"wrote {path}")
    return 0


def command_lessons(args: argparse.Namespace) -> int:
    if args.copy is not None:
        return copy_lessons(args)
    if args.student or args.force:
        raise ValueError("--student and --force go with --copy DIR")
    try:
        from pedaPEFT import notebooks
    except ImportError as error:
        raise ValueError(
            f"building lessons needs {error.name} (python -m pip install -e '.[lessons,test]'; "
            "python -m pedaPEFT env lists what is missing)"
        ) from None

    if args.check:
        problems = notebooks.check()
        for problem in problems:
            print(problem)
        print("lessons are in sync" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    for source in notebooks.find_sources(args.names):
        print(f"building {source.stem} ...", flush=True)
        lesson, student = notebooks.build(source)
        print(f"  wrote {lesson.relative_to(REPO_DIR)} and {student.relative_to(REPO_DIR)}")
    return 0


def command_readme(args: argparse.Namespace) -> int:
    from pedaPEFT import readme
    return readme.main(check=args.check)


def copy_lessons(args: argparse.Namespace) -> int:
    """``lessons --copy DIR [--student] [--force]``: the installed notebooks, copied out."""
    from pedaPEFT import course_files

    if args.names or args.check:
        print("error: --copy takes no lesson names and no --check", file=sys.stderr)
        return 2
    try:
        written = course_files.copy_lessons(args.copy, student=args.student, force=args.force)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    kind = "student notebooks" if args.student else "lessons"
    print(f"copied {len(written)} {kind} to {args.copy}")
    for path in written:
        print(f"  {path.name}")
    print(f"open them with: jupyter lab {args.copy}")
    return 0


def command_lora_experiment(args: argparse.Namespace) -> int:
    from pedaPEFT import experiments, files

    name = f"lora_{args.name}" + ("" if args.task in (None, "shift") else f"_{args.task}")
    out = Path(args.out) if args.out else experiments.results_path(name)
    files.check_output_file(out, "--out")
    results = experiments.experiment(args.name, args.scale, args.task, log=print)
    experiments.write_results(results, out)
    print(f"wrote {out} ({results['seconds']:.0f} s)")
    return 0


def command_pretrain(args: argparse.Namespace) -> int:
    import os
    import time
    from dataclasses import replace

    import torch

    from pedaPEFT import files, gpt, train, train_text

    out = files.check_output_dir(args.out, "--out")
    for path in gpt.pretrained_paths(args.preset, out):
        files.check_output_file(path, "--out", overwrite=args.force)
    if args.checkpoint:
        files.check_output_file(args.checkpoint, "--checkpoint")
    torch.set_num_threads(args.threads)
    text = args.preset in train_text.TEXT_PRESETS
    recipe = train_text if text else train
    config = train_text.PYDOCS_PRETRAIN_CONFIG if text else train.PRETRAIN_CONFIG
    config = replace(config, progress=not args.no_progress)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    start = time.perf_counter()
    model, info = recipe.pretrain_base(args.preset, config, args.seed, args.checkpoint,
                                       args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        # A text base is stored in bfloat16, half the download; the tests measure its
        # validation perplexity again on the stored weights.
        dtype = torch.bfloat16 if text else None
        weights, _ = gpt.save_pretrained(model, info, out, args.preset, dtype=dtype)
        print(f"final loss {info['final_loss']:.4f}")
        for name, value in info["metrics"].items():
            print(f"{name}: {value}" if text else f"exact match {name}: {value:.3f}")
        print(f"wrote {weights} ({time.perf_counter() - start:.0f} s)")
    return 0


def command_finetune(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from pedaPEFT import corpus, files, gpt, train, train_text

    if args.checkpoint:
        files.check_output_file(args.checkpoint, "--checkpoint")
    options = {}
    if args.method in ("lora", "qlora"):
        default_targets = ["q", "v"] if args.method == "lora" else list(gpt.ALL_LINEAR)
        options = {"r": args.r, "alpha": args.alpha, "targets": args.targets or default_targets,
                   "dropout": args.lora_dropout}
        if args.method == "qlora":
            options["quant_type"] = args.quant_type
    elif args.method == "adapter":
        options = {"bottleneck": args.bottleneck}
    torch.set_num_threads(args.threads)
    text = args.task in corpus.DOMAINS
    defaults = train_text.TEXT_FINETUNE_CONFIG if text else train.FINETUNE_CONFIG
    config = replace(defaults, progress=not args.no_progress)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.lr is not None:
        config = replace(config, lr=args.lr)
    base = args.base or ("pydocs" if text else "tiny")
    model = gpt.load_pretrained(base)
    if text:
        result = train_text.finetune_text(model, args.task, args.method, config,
                                          method_options=options, checkpoint=args.checkpoint)
        print(f"domain {result.domain} on base {base}, method {result.method}: trainable "
              f"{result.trainable:,} of {result.total:,} parameters "
              f"({100 * result.trainable_fraction:.2f}%)")
        print(f"held-out perplexity before {result.perplexity_before:.2f}, after "
              f"{result.perplexity:.2f} ({result.run.seconds:.0f} s)")
        return 0
    result = train.finetune(model, args.task, args.method, config, n_train=args.n_train,
                            method_options=options, checkpoint=args.checkpoint)
    print(f"task {result.task}, method {result.method}: trainable {result.trainable:,} of "
          f"{result.total:,} parameters ({100 * result.trainable_fraction:.2f}%)")
    print(f"exact match before {result.accuracy_before:.3f}, after {result.accuracy:.3f} "
          f"({result.run.seconds:.0f} s)")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from pedaPEFT import demo, files

    demo.demo(args.task, out_dir=files.check_output_dir(args.out, "--out"))
    return 0


def command_qlora_experiment(args: argparse.Namespace) -> int:
    from pedaPEFT import experiments, files

    name = "qlora_qv" if args.rows == "qv" else "qlora_table3"
    out = Path(args.out) if args.out else experiments.results_path(f"{name}_{args.task}")
    files.check_output_file(out, "--out")
    results = experiments.experiment(name, args.scale, args.task, log=print)
    experiments.write_results(results, out)
    print(f"wrote {out}")
    return 0


def command_progress(args: argparse.Namespace) -> int:
    from pedaPEFT import progress
    from pedaPEFT.exercise_bank import EXERCISES

    if args.list:
        print(progress.exercise_list(EXERCISES), end="")
        return 0
    print(f"progress file: {progress.progress_path()}\n")
    print(progress.table(EXERCISES, progress.load()), end="")
    return 0


def command_grade(args: argparse.Namespace) -> int:
    from pedaPEFT import grading

    try:
        grades = grading.grade(Path(args.submissions), args.cell_timeout, args.notebook_timeout,
                               log=print)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    csv_path, summary = grading.write_gradebook(grades, Path(args.out))
    print(f"wrote {csv_path} and {summary} ({len(grades)} notebooks)")
    return 0


def command_realtext_experiment(args: argparse.Namespace) -> int:
    from pedaPEFT import experiments, files, realtext

    out = Path(args.out) if args.out else realtext.results_path()
    files.check_output_file(out, "--out")
    results = realtext.experiment(args.scale, log=print)
    experiments.write_results(results, out)
    for row in results["summary"]:
        print(f"{row['label']:16s} perplexity {row['perplexity_before']:.2f} -> "
              f"{row['perplexity_after']:.2f} ± {row['perplexity_after_std']:.2f}")
    print(f"wrote {out}")
    return 0


def command_site(args: argparse.Namespace) -> int:
    import time

    from pedaPEFT import site

    start = time.perf_counter()
    try:
        pages = site.build(Path(args.out))
    except (ValueError, site.SiteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(pages)} pages to {args.out} ({time.perf_counter() - start:.0f} s); "
          f"open {Path(args.out) / 'index.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m pedaPEFT",
        description="pedaPEFT: parameter-efficient fine-tuning taught from scratch.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="the course's main job: QLoRA fine-tuning of the tiny GPT, start to finish"
    )
    demo.add_argument("--task", default="shift", choices=TASKS,
                      help="downstream task (default: shift)")
    demo.add_argument("--out", default="runs", help="folder for the figure (default: runs)")
    demo.set_defaults(run=command_demo)

    qlora_experiment = commands.add_parser(
        "qlora-experiment", help="lesson 9's sweep: full FT vs LoRA vs QLoRA (NF4, FP4, int8)"
    )
    qlora_experiment.add_argument("--scale", choices=["small", "full"], default="small")
    qlora_experiment.add_argument("--task", default="reverse", choices=TASKS,
                                  help="downstream task (default: reverse)")
    qlora_experiment.add_argument(
        "--rows", default="all", choices=["all", "qv"],
        help="all (default): table 3's seven rows at fixed learning rates; qv: its two W_q, W_v "
             "rows, each with its learning rate chosen on a validation split")
    qlora_experiment.add_argument(
        "--out", default=None,
        help="output JSON (default: results/qlora_table3_<task>.json, or qlora_qv_<task>.json "
             "with --rows qv; --out pedaPEFT/results/<that name> refreshes the shipped copy)")
    qlora_experiment.set_defaults(run=command_qlora_experiment)

    realtext = commands.add_parser(
        "realtext-experiment",
        help="lesson 11's sweep: full FT, LoRA and QLoRA of the pydocs base on held-out text",
    )
    realtext.add_argument("--scale", choices=["small", "full"], default="small")
    realtext.add_argument(
        "--out", default=None, help="output JSON (default: figures/data/realtext_asyncio.json)"
    )
    realtext.set_defaults(run=command_realtext_experiment)

    env = commands.add_parser("env", help="check that this machine has what the course needs")
    env.set_defaults(run=command_env)

    figures = commands.add_parser("figures", help="regenerate every PNG in figures/")
    figures.add_argument("names", nargs="*", help="figure names (default: all)")
    figures.add_argument("--out", default="figures",
                         help="output folder (default: figures/ in the working directory)")
    figures.set_defaults(run=command_figures)

    lessons = commands.add_parser(
        "lessons",
        help="copy the lessons out of the installed package (--copy DIR), or, in a clone, "
             "build notebooks (with outputs) and student copies from their scripts",
    )
    lessons.add_argument("names", nargs="*", help="lessons to build, e.g. 01 (default: all)")
    lessons.add_argument(
        "--check", action="store_true", help="only report drift between scripts and notebooks"
    )
    lessons.add_argument(
        "--copy", metavar="DIR", default=None,
        help="copy the installed lesson notebooks into DIR (created if missing)",
    )
    lessons.add_argument(
        "--student", action="store_true",
        help="with --copy: the exercise versions (solutions stubbed, outputs cleared)",
    )
    lessons.add_argument(
        "--force", action="store_true", help="with --copy: overwrite notebooks already in DIR"
    )
    lessons.set_defaults(run=command_lessons)

    readme = commands.add_parser(
        "readme", help="write the README's lesson runtimes (recorded by the test run) and its "
                       "memory conventions table (from pedaPEFT.memory)")
    readme.add_argument("--check", action="store_true", help="only report what differs")
    readme.set_defaults(run=command_readme)

    site = commands.add_parser(
        "site", help="build the course website (static HTML) from the stored notebooks"
    )
    site.add_argument("--out", default="_site", help="output folder (default: _site)")
    site.set_defaults(run=command_site)

    lora_experiment = commands.add_parser(
        "lora-experiment", help="lessons 4-5: adapters, LoRA tables 5-6, what LoRA learns"
    )
    lora_experiment.add_argument("name", choices=["adapters", "tables", "learns"])
    lora_experiment.add_argument("--scale", choices=["small", "full"], default="small")
    lora_experiment.add_argument("--task", default=None, choices=TASKS,
                                 help="downstream task (default: shift)")
    lora_experiment.add_argument(
        "--out", default=None,
        help="output JSON (default: results/lora_<name>[_<task>].json in the working directory; "
             "--out pedaPEFT/results/lora_<name>.json refreshes a clone's committed copy)"
    )
    lora_experiment.set_defaults(run=command_lora_experiment)

    pretrain = commands.add_parser(
        "pretrain", help="pretrain a GPT preset (synthetic mixture, or Python's documentation "
                         "for pydocs) and save it as a base"
    )
    pretrain.add_argument("--preset", default="tiny", choices=PRESETS,
                          help="tiny (default), small, gpt2 or pydocs (real text)")
    pretrain.add_argument("--steps", type=positive_int, default=None,
                          help="training steps (default: the recipe's)")
    pretrain.add_argument("--seed", type=non_negative_int, default=0)
    pretrain.add_argument("--out", default="runs",
                          help="output folder (default: runs/ in the working directory; "
                               "--out pedaPEFT/weights --force refreshes a clone's shipped base)")
    pretrain.add_argument("--force", action="store_true",
                          help="replace <out>/<preset>.safetensors and .json if they exist")
    pretrain.add_argument("--checkpoint", default=None, help="checkpoint file to write")
    pretrain.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")
    pretrain.add_argument("--threads", type=positive_int, default=1,
                          help="CPU threads per process (default 1: fastest for tiny models)")
    pretrain.set_defaults(run=command_pretrain)

    finetune = commands.add_parser(
        "finetune", help="fine-tune the pretrained base on a downstream task and score it"
    )
    finetune.add_argument("--task", required=True, choices=TASKS + TEXT_DOMAINS,
                          help="downstream task: shift, reverse or swap (pedaPEFT.data.TASKS), "
                               "or a held-out text domain: asyncio (pedaPEFT.corpus.DOMAINS)")
    finetune.add_argument("--method", default="full", choices=METHODS,
                          help="full (default), top, feature, lora, adapter or qlora")
    finetune.add_argument("--base", default=None, choices=SHIPPED_BASES,
                          help="shipped base (default: pydocs for a text domain, else tiny)")
    finetune.add_argument("--steps", type=positive_int, default=None,
                          help="training steps (default: train.FINETUNE_CONFIG's)")
    finetune.add_argument("--lr", type=positive_float, default=None,
                          help="peak learning rate (default: train.FINETUNE_CONFIG's)")
    finetune.add_argument("--n-train", type=positive_int, default=2048,
                          help="training examples")
    finetune.add_argument("--r", type=positive_int, default=8, help="LoRA rank (--method lora)")
    finetune.add_argument("--alpha", type=positive_float, default=16,
                          help="LoRA alpha (--method lora)")
    finetune.add_argument("--targets", type=target_list, default=None,
                          help="LoRA target modules, comma-separated (--method lora: default "
                               "q,v; --method qlora: every linear layer of the blocks)")
    finetune.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES,
                          help="frozen base format for --method qlora: nf4, fp4 or int8")
    finetune.add_argument("--lora-dropout", type=probability, default=0.0,
                          help="dropout on the LoRA branch (--method lora)")
    finetune.add_argument("--bottleneck", type=positive_int, default=16,
                          help="adapter bottleneck size (--method adapter)")
    finetune.add_argument("--checkpoint", default=None, help="checkpoint file to write")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bar")
    finetune.add_argument("--threads", type=positive_int, default=1,
                          help="CPU threads (default 1: fastest for tiny models)")
    finetune.set_defaults(run=command_finetune)

    progress = commands.add_parser(
        "progress", help="your exercise progress per lesson (done / tried / not started)"
    )
    progress.add_argument("--list", action="store_true",
                          help="list every exercise per lesson (Markdown) instead")
    progress.set_defaults(run=command_progress)

    grade = commands.add_parser(
        "grade", help="instructors: run submitted student notebooks and write a gradebook"
    )
    grade.add_argument("submissions", metavar="SUBMISSIONS_DIR",
                       help="<student>/<lesson>.ipynb or <student>.ipynb files")
    grade.add_argument("--out", default="gradebook.csv",
                       help="gradebook CSV (default gradebook.csv; a .md summary beside it)")
    grade.add_argument("--cell-timeout", type=float, default=120.0,
                       help="seconds one cell may run before it is interrupted (default 120)")
    grade.add_argument("--notebook-timeout", type=float, default=900.0,
                       help="seconds one notebook may run before it is killed (default 900)")
    grade.set_defaults(run=command_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (a ``ValueError`` from the checks of the package, which
    name the argument and its allowed values) is printed as one line, with exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and not args.checkpoint:
        parser.error("argument --resume: needs --checkpoint (the file to continue from)")
    try:
        return args.run(args)
    except ValueError as error:
        message = " ".join(str(error).split())
        print(f"python -m pedaPEFT {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
