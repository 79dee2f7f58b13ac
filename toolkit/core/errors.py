"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class MosaicError(Exception):
    """Bad input or a failed step; the message names the file or task and the problem."""
