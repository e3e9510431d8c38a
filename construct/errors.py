"""Error types users see as one clear line (the CLIs print them without a traceback)."""


class ConStructError(Exception):
    """Base class: a problem with the user's input, files or setup, not a bug."""


class ConfigError(ConStructError):
    """A configuration file or override is invalid."""


class DataError(ConStructError):
    """A dataset file or folder is missing or invalid."""


class CheckpointError(ConStructError):
    """A checkpoint or weight file is missing, untrusted or does not fit the model."""
