"""Benchmarks and measurement scripts, installed as `vtprune.eval` (the folder is `eval/` in the repo)."""
