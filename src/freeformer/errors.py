"""User-facing errors.

Anything the user can fix (a bad config value, flag, file, token id, checkpoint) raises a
subclass of :class:`UserError` with a one-line message that names what is wrong and how to
fix it. The CLI prints it to stderr without a traceback and exits non-zero.
"""


class UserError(Exception):
    """A mistake in user input; the message is a single line meant for the user."""


class ConfigError(UserError, ValueError):
    """An invalid configuration field or override."""


class DataError(UserError, ValueError):
    """Unusable data: empty corpus, token id out of range, malformed file."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, truncated, corrupted or incompatible."""


class ConvertError(UserError, ValueError):
    """A pretrained model that cannot be converted: unsupported architecture or
    quantisation, a missing or mismatched tensor, a bad config value."""
