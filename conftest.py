"""Repository-wide pytest configuration."""

import os
from pathlib import Path

# Student copies are generated with stubs that fail by design; tests/test_lessons.py runs them.
collect_ignore_glob = ["lessons/student/*", "lessons/*.py", "benchmarks/*"]


def pytest_addoption(parser):
    parser.addoption(
        "--record-runtimes", nargs="?", const="benchmarks/lesson_runtimes.json", default=None,
        metavar="FILE",
        help="record each lesson notebook's wall time under nbval (kernel start to stop) in "
             "FILE (default benchmarks/lesson_runtimes.json, which python -m pedaPEFT readme "
             "copies into the README)",
    )


class RuntimeRecorder:
    """Adds up the setup, call and teardown durations of every cell of each lesson notebook
    (the kernel starts in the first cell's setup and stops in the last one's teardown)."""

    def __init__(self, path):
        self.path = path
        self.seconds, self.loads, self.failed = {}, {}, set()

    def pytest_runtest_logreport(self, report):
        path = report.nodeid.split("::")[0]
        if not path.endswith(".ipynb") or Path(path).parent.name != "lessons":
            return
        lesson = Path(path).stem
        self.seconds[lesson] = self.seconds.get(lesson, 0.0) + report.duration
        self.loads.setdefault(lesson, []).append(os.getloadavg()[0])
        if report.failed:
            self.failed.add(lesson)

    def pytest_sessionfinish(self, session):
        from pedaPEFT import runtimes

        passed = {name: s for name, s in self.seconds.items() if name not in self.failed}
        if passed:
            loads = {name: sum(self.loads[name]) / len(self.loads[name]) for name in passed}
            runtimes.record(passed, loads, self.path)


def pytest_configure(config):
    """Exercise checks record progress; during tests (and the lesson kernels nbval starts,
    which inherit this environment) they write to a throwaway file, not the user's."""
    import tempfile

    directory = tempfile.mkdtemp(prefix="pedapeft-test-progress-")
    os.environ["PEDAPEFT_PROGRESS_FILE"] = os.path.join(directory, "progress.json")
    path = config.getoption("--record-runtimes")
    if path is not None:
        recorder = RuntimeRecorder(Path(config.rootpath, path))
        config.pluginmanager.register(recorder, "pedapeft-runtime-recorder")
