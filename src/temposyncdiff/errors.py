"""User-facing errors: the CLIs print these as one line (no traceback) and exit with status 2."""


class UserError(Exception):
    """Bad input or setup the user can fix: a missing file, a corrupt video, a missing system package."""
