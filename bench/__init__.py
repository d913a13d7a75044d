"""Benchmarks of flask_credits against the physical limit of a debit, measured in the same run.

Run ``python -m bench --help``; ``docs/benchmarks.md`` explains the method and holds the last full run.
"""
