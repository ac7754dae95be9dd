"""Project exceptions: every bad input is reported with the offending file/field and what was expected."""


class EvoxMergeError(Exception):
    """Base class of every error evox-merge raises on purpose."""


class MergeInputError(EvoxMergeError, ValueError):
    """A base model, adapter, coefficient vector or config that cannot be merged as given."""


class TaskFormatError(EvoxMergeError, ValueError):
    """A task file or task spec that cannot be scored (names the file, line and field)."""


class ZooError(EvoxMergeError, FileNotFoundError):
    """A missing, partial or corrupted offline zoo (names the file and the command that rebuilds it)."""


class RunStateError(EvoxMergeError, RuntimeError):
    """An output directory whose run files cannot be continued or replaced as asked (names the file and what to do)."""
