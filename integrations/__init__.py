"""Model-family integrations, installed as `vtprune.integrations` (the folder is `integrations/` in the repo).

One module per family (`llava`, `llava_next`, `qwen_vl`, `timm_vit`), each an `vtprune.integration.Integration`
subclass registered under the ``vtprune.integrations`` entry-point group in pyproject.toml; `common/` holds the
pieces several families share (CLIP-style attention probes, in-encoder merging runners, virtual unmerging);
`lmms_eval/` adapts the families to lmms-eval; `tiny_models` builds small random-weight models of each family for
tests and benchmarks. Integrations know model classes and nothing about particular pruners; they import the
library (`vtprune`), never the applications.
"""
