"""Merge-quality benchmark suites (DESIGN.md §4): ``exact`` (closed forms) and ``digits``.

Run ``python -m benchmarks.quality.exact [--quick]`` and
``python -m benchmarks.quality.digits [--quick] [--backbone mlp|cnn|vit|all]``.
"""
