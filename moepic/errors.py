"""Errors a user can cause. The CLI prints these as one line and exits non-zero, with no traceback.

Anything else that escapes is a bug in moepic and keeps its traceback.
"""


class MoepicError(Exception):
    """A problem with the user's input: a file, a config key, a value. The message names it."""


class CheckpointError(MoepicError):
    """A model folder that cannot be read: missing, corrupt, unsupported or misshaped."""


class ConfigError(MoepicError):
    """A bad YAML file, config key, override or option value."""
