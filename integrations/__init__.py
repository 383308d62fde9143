"""Model-family integrations, installed as `vtprune.integrations` (the folder is `integrations/` in the repo).

One module per family; each registers an `Integration` subclass. Integrations know model classes and nothing
about particular pruners.
"""

from . import llava  # noqa: F401
from . import llava_next  # noqa: F401
from . import qwen_vl  # noqa: F401
from . import timm_vit  # noqa: F401
