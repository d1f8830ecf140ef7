"""The one base of the errors this project raises on purpose."""

from __future__ import annotations


class A3POError(Exception):
    """An error raised on purpose, its message naming the file, field or value at fault and what to do.

    Entry points catch this one class: they print ``error: <message>`` (no traceback) and exit with
    ``exit_code``, 2 for input the user fixes before a run (a recipe, a file, a flag, a checkpoint), 1 for
    a run that failed on its way (a rank, the rollout fleet, a weight update). Each subclass also keeps
    the builtin base its callers catch (ValueError for bad input, RuntimeError for a failure)."""

    exit_code = 2


class RunFailure(A3POError):
    """Base of the errors of a run that failed on its way (exit status 1)."""

    exit_code = 1
