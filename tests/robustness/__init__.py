"""Robustness and security suite (issue 14): bad input, corrupted artifacts, untrusted code, interrupted runs,
exhaustion, numerical faults. A package so that its conftest does not shadow ``tests/conftest.py``."""
