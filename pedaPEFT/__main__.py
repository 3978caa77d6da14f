"""The course's command line: ``python -m pedaPEFT <command> [options]``.

Run ``python -m pedaPEFT --help`` for the list of commands, and ``--help`` after a command for
its options.
"""

import argparse
import sys
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def command_env(args: argparse.Namespace) -> int:
    from pedaPEFT import envcheck

    return envcheck.main()


def command_figures(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from pedaPEFT import figures

    for path in figures.write_figures(Path(args.out), args.names or None):
        print(f"wrote {path}")
    return 0


def command_lessons(args: argparse.Namespace) -> int:
    from pedaPEFT import notebooks

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


def command_lora_experiment(args: argparse.Namespace) -> int:
    from pedaPEFT import experiments

    results = experiments.experiment(args.name, args.scale, args.task, log=print)
    out = Path(args.out) if args.out else experiments.results_path(args.name)
    experiments.write_results(results, out)
    print(f"wrote {out} ({results['seconds']:.0f} s)")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    status = command_env(args)
    if status:
        return status
    return command_figures(argparse.Namespace(out=str(REPO_DIR / "figures"), names=None))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pedaPEFT",
        description="pedaPEFT: parameter-efficient fine-tuning taught from scratch.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the course's main job")
    demo.set_defaults(run=command_demo)

    env = commands.add_parser("env", help="check that this machine has what the course needs")
    env.set_defaults(run=command_env)

    figures = commands.add_parser("figures", help="regenerate every PNG in figures/")
    figures.add_argument("names", nargs="*", help="figure names (default: all)")
    figures.add_argument("--out", default=str(REPO_DIR / "figures"), help="output folder")
    figures.set_defaults(run=command_figures)

    lessons = commands.add_parser(
        "lessons", help="build lesson notebooks (with outputs) and student copies from scripts"
    )
    lessons.add_argument("names", nargs="*", help="lessons to build, e.g. 01 (default: all)")
    lessons.add_argument(
        "--check", action="store_true", help="only report drift between scripts and notebooks"
    )
    lessons.set_defaults(run=command_lessons)

    lora_experiment = commands.add_parser(
        "lora-experiment", help="fine-tuning sweeps of lessons 4-5 (adapters, LoRA tables 5-6)"
    )
    lora_experiment.add_argument("name", choices=["adapters", "tables"])
    lora_experiment.add_argument("--scale", choices=["small", "full"], default="small")
    lora_experiment.add_argument("--task", default=None, help="downstream task (default: shift)")
    lora_experiment.add_argument(
        "--out", default=None, help="output JSON (default: figures/data/lora_<name>.json)"
    )
    lora_experiment.set_defaults(run=command_lora_experiment)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
