"""Clips made in code for tests, so that no video file is needed."""

from promptus.video import synthetic_clip  # noqa: F401  (one definition, shared with the benchmarks)
