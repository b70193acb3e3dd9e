"""Errors a user can fix. The entry point prints them as one message, without a traceback."""


class GistExpError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""


class ConfigError(GistExpError):
    pass


class DataError(GistExpError):
    pass


class WeightsError(GistExpError):
    pass


class CheckpointError(GistExpError):
    pass


class NonFiniteLossError(GistExpError):
    pass
