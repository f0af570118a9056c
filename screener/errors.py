"""Exceptions that carry a message meant for a person, not a traceback."""


class UserError(Exception):
    """A mistake in input or configuration: the CLI prints the message and exits non-zero."""


class ConfigError(UserError):
    """config.toml (or an override) is invalid; the message names the key."""


class ManifestError(UserError):
    """An engine folder's manifest is missing, malformed, or does not match its files."""


class DataError(UserError):
    """A data set cannot be read; the message names the file."""
