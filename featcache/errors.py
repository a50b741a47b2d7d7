"""The exceptions featcache raises for problems a user can fix.

Every message reads "expected X, got Y; fix: Z" (or close to it) and names the file or option
involved, so the CLI can print it as one line and exit with code 2.
"""


class FeatcacheError(Exception):
    """Base class of the errors caused by input the user can correct."""


class BadInputError(FeatcacheError, ValueError):
    """An option, dataset or file has the wrong content or shape."""


class UnreadableImageError(BadInputError):
    """An image file that Pillow cannot decode (or a decompression bomb)."""


class DivergedError(BadInputError):
    """Training diverged: a validation loss that is not finite (a search records that trial as failed)."""


class MissingInputError(FeatcacheError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class DownloadError(FeatcacheError, OSError):
    """A download failed (most often: this machine has no internet)."""


class CacheError(FeatcacheError):
    """A cache file is not usable: foreign, corrupt, stale, or of another format version."""


class DiskFullError(FeatcacheError, OSError):
    """An output did not fit on its disk (or quota): nothing was replaced, nothing half-written kept."""


class WorkerError(RuntimeError):
    """A process featcache started (a Ray worker, a decoding or reading process) failed or died: killed, or out of
    memory. Not bad input (the CLI exits with 1), but said in one line, with what was kept and how to go on."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for one-line errors."""
    return str(e).strip().split("\n")[0][:200]
