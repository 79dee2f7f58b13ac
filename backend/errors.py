"""The backend's one error type: a MosaicError that also says which HTTP status it maps to."""
from __future__ import annotations

from mosaic_toolkit.core.errors import InternalError, MosaicError


class BackendError(MosaicError):
    """A request the backend cannot serve; ``status`` is the HTTP status of the JSON answer.

    400: the request is malformed or asks for something impossible (no image, a click outside
    the image); 401: missing credentials; 404: unknown task or model version; 409: a training
    run is already going on; 413: the image is too large; 502: Label Studio (or the image host
    it redirects to) failed; 504: a time limit ran out.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def status_of(exc: BaseException) -> int:
    """The HTTP status for an exception: BackendError's own, 500 for the toolkit's InternalError
    (a bug), 400 for other MosaicErrors (bad input found by the toolkit), 500 for anything else."""
    if isinstance(exc, BackendError):
        return exc.status
    if isinstance(exc, InternalError):
        return 500
    if isinstance(exc, MosaicError):
        return 400
    return 500
