"""The applications, installed as `vtprune.apps` (the folder is `apps/` in the repo): programs built on the library
and the integrations, which neither of them imports.

- `experiment`: the ``vtprune`` Hydra app (one job per (model, pruner, budget, benchmark); sweeps with ``-m``);
- `harness`: scoring a model on a benchmark (accuracy, loyalty, latency, FLOPs, memory) with or without pruning;
- `report`: the ``vtprune-report`` command (a sweep's table and plots);
- `demo`: the ``vtprune-demo`` command, the main job (`make demo`);
- `calibrate`: the ``vtprune-calibrate`` command (DyMU thresholds from an image folder);
- `models`: loading a model from a config (the embedded model, tiny builders, the Hub, a folder).
"""
