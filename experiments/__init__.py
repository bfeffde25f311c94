"""Experiments with the trainer: every arm of a suite over the same seeds, a report with paired tests.

``python -m experiments --help``; experiments/README.md describes the suites and what they found.
"""
