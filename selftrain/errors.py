"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input that the user can fix: the message names the problem and the fix."""


class ConfigError(UserError):
    """A recipe key, type or value is wrong."""


class DataError(UserError):
    """A data set path, image or label is missing, corrupt or inconsistent."""


class StoreError(UserError):
    """A pseudo-label file is incomplete, foreign or corrupt."""
