"""Exceptions raised by vtprune. All derive from built-in types so callers can catch them generically."""


class VTPruneError(Exception):
    """Base class of every error vtprune raises on purpose."""


class ConfigError(VTPruneError, ValueError):
    """A pruner, budget or option value is invalid."""


class BudgetError(ConfigError):
    """The token budget cannot be met for the given input (e.g. keep larger than the tokens available)."""


class UnsupportedModelError(VTPruneError, TypeError):
    """vtprune has no integration for this model class."""


class AlreadyPatchedError(VTPruneError, RuntimeError):
    """`vtprune.apply` was called on a model that is already patched."""


class MissingCLSError(VTPruneError, ValueError):
    """A method needs a CLS token but the vision encoder has none and the fallback is disabled."""
