"""fastllm benchmarks: ``python -m benchmarks [--quick]`` times fastllm against its references.

Suites live in ``suite_<name>.py`` (each returns a list of ``harness.Case``); ``runner`` times
them, ``report`` writes JSON, a markdown table and a PNG per suite. See benchmarks/README.md.
"""
