"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserFacingError(Exception):
    """A problem the user can fix; the message names the cause and the fix."""


class ModelNotFoundError(UserFacingError):
    """Weights that could not be found locally or on the hub."""


class DataError(UserFacingError):
    """A dataset that cannot be used as configured, or a bad row in strict mode."""
