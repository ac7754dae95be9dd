"""The error of a smollm2 build that lacks one of its inputs (a download that failed, a file that is not there)."""

from evox_merge.util.errors import MergeInputError


class SourceUnavailableError(MergeInputError):
    """A download or local file the smollm2 zoo needs is unavailable; the message says which and how to provide it."""
