"""Mechanisms with no domain knowledge: child processes, atomic files, locks, hashing, YAML."""
