"""Test-suite settings shared by every test module."""

from hypothesis import settings

# Property tests judge correctness, not speed: a slow shared CI machine must not turn a
# correct example into a DeadlineExceeded failure.
settings.register_profile("pedapeft", deadline=None)
settings.load_profile("pedapeft")
