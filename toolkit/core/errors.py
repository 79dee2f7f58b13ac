"""The toolkit's errors: what the user can fix versus what is a bug.

* :class:`InputError` — bad input (a file, an option, a request): the message names the file or
  task and the problem. The CLI prints it on one line and exits 1; the backend answers 400.
* :class:`InternalError` — a broken internal check (an engine returning the wrong shape, an API
  used against its contract). The CLI still prints one line and exits 1; the backend answers
  500 and logs it as a failure of its own.

:class:`MosaicError` is their common base, the one type the CLI catches. Raised directly (the
older call sites) it means bad input, as :class:`InputError` does.
"""


class MosaicError(Exception):
    """Bad input or a failed step; the message names the file or task and the problem."""


class InputError(MosaicError):
    """Bad input the user can fix (file, option, request)."""


class InternalError(MosaicError):
    """A broken internal check: a bug, not the user's input."""
