"""One line for a Hub source that cannot be had: offline, mistyped, missing or gated.

huggingface_hub raises a different class for each case (and an HTTP client error when the network is
down during an upload), each with a multi-line message; the command-line tools print this line instead
of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import errors

NETWORK_ERRORS = (
    "ConnectError",
    "ConnectTimeout",
    "TimeoutException",
    "NetworkError",
    "TransportError",
    "ConnectionError",
)


def looks_like_path(source: str) -> bool:
    """A local path rather than a Hub id (`org/name`): what a typo in a folder name usually looks like."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1


def hub_error_line(exc: BaseException, source: str) -> str | None:
    """`source: why it cannot be had and what to do`, or None when `exc` is not about reaching the Hub."""
    if isinstance(exc, errors.HFValidationError):
        return f"{source}: no such local file or folder, and not a valid Hub repo id (org/name)"
    if isinstance(exc, errors.GatedRepoError):
        return f"{source}: gated on the Hub; accept its terms on the model page and log in (`hf auth login`)"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{source}: not found on the Hub (check the id; private repos need `hf auth login` or HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{source}: the requested revision does not exist on the Hub"
    if isinstance(exc, errors.OfflineModeIsEnabled):
        return f"{source}: the Hub cannot be reached in offline mode (HF_HUB_OFFLINE=1); unset it and retry online"
    if isinstance(exc, errors.LocalEntryNotFoundError):
        return (
            f"{source}: not in the local Hugging Face cache and the Hub cannot be reached (offline, or "
            "HF_HUB_OFFLINE=1); download it once while online, or pass a local folder"
        )
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{source}: the Hub repo does not have the expected file ({exc.args[0].splitlines()[0][:200]})"
    if any(cls.__name__ in NETWORK_ERRORS for cls in type(exc).__mro__):
        return f"{source}: the Hub cannot be reached ({type(exc).__name__}: {exc}); check the network and retry"
    return None


@contextmanager
def reaching(source: str, error: type[Exception] = ValueError) -> Iterator[None]:
    """Run Hub calls for `source`; a failure to reach or find it becomes `error(one line)`."""
    try:
        yield
    except Exception as e:
        line = hub_error_line(e, source)
        if line is None:
            raise
        raise error(line) from None
