"""Hydra configuration of the `vtprune` app, installed as `vtprune.configs` (the folder is `configs/`)."""
