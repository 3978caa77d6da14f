"""Repository-wide pytest configuration."""

# Student copies are generated with stubs that fail by design; tests/test_lessons.py runs them.
collect_ignore_glob = ["lessons/student/*", "lessons/*.py", "benchmarks/*"]


def pytest_configure(config):
    """Exercise checks record progress; during tests (and the lesson kernels nbval starts,
    which inherit this environment) they write to a throwaway file, not the user's."""
    import os
    import tempfile

    directory = tempfile.mkdtemp(prefix="pedapeft-test-progress-")
    os.environ["PEDAPEFT_PROGRESS_FILE"] = os.path.join(directory, "progress.json")
