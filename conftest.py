"""Repository-wide pytest configuration."""

# Student copies are generated with stubs that fail by design; tests/test_lessons.py runs them.
collect_ignore_glob = ["lessons/student/*", "lessons/*.py", "benchmarks/*"]
