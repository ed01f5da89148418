"""The dsm_redis benchmark: ``python -m bench`` (see BENCHMARKS.md). Not part of the test run."""
