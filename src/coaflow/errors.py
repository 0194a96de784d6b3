"""The errors a run can end with, and the exit code an orchestrator acts on for each.

``EXIT_CODES`` below is the one table: ``coaflow --help`` prints it (``exit_codes_help``),
docs/stages.md holds it (``exit_codes_markdown``; a test compares), and the Airflow and Kubeflow
engines map the same codes. 75 is ``EX_TEMPFAIL`` of sysexits.h.

Every message is one line meant to be shown as is: it names the file, field or URL at fault.
"""

from __future__ import annotations

from typing import Any

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_GATE, EXIT_PROMOTION, EXIT_RETRY = 0, 1, 2, 3, 4, 75
RETRYABLE_EXIT_CODES = (EXIT_RETRY,)

# code, what raises it, what it means (and what Airflow, KFP or a shell script should do)
EXIT_CODES = (
    (EXIT_OK, "-", "done (a cached stage counts as done)"),
    (EXIT_BUG, "anything unexpected", "a bug in coaflow or a library: read the traceback, do "
     "not retry"),
    (EXIT_USER, "`UserError` (`ConfigError`, `DataError`, `PipelineError`)", "bad config, file "
     "or argument: fix the input, do not retry"),
    (EXIT_GATE, "`GateRefused`", "a data quality gate refused the batch: read the quarantine and "
     "Data Docs"),
    (EXIT_PROMOTION, "`PromotionRefused`", "promotion refused: the candidate did not win; "
     "nothing moved, deploy is skipped, the run is not failed"),
    (EXIT_RETRY, "`ServiceUnavailable`", "an endpoint or the tracking server was unreachable or "
     "timed out: retry with backoff"),
)


def exit_codes_help() -> str:
    """``EXIT_CODES`` as the epilog of ``coaflow --help`` (click keeps ``\\b`` blocks as they
    are)."""
    return "\b\nExit codes (what an orchestrator acts on):\n" + "".join(
        f"  {code:<3} {meaning}\n" for code, _, meaning in EXIT_CODES)


def exit_meaning(code: int) -> str:
    """What exit ``code`` means, in a few words (a failed task's message).

    >>> exit_meaning(75)
    'an endpoint or the tracking server was unreachable or timed out'
    """
    return next((m.split(":")[0] for c, _, m in EXIT_CODES if c == code), "an error")


def exit_codes_markdown() -> str:
    """``EXIT_CODES`` as docs/stages.md's table."""
    return "| code | raised as | what it means, what an orchestrator does |\n|---|---|---|\n" + \
        "".join(f"| {code} | {raised} | {meaning} |\n" for code, raised, meaning in EXIT_CODES)


class CoaflowError(Exception):
    """Base of the errors coaflow raises on purpose; ``exit_code`` is what the CLI exits with."""

    exit_code = EXIT_BUG


class UserError(CoaflowError):
    """Bad config, file, argument or input data."""

    exit_code = EXIT_USER


class PipelineError(UserError, RuntimeError):
    """A user-facing failure of a stage or of the run's set-up (missing input, bad model folder)."""


class GateRefused(CoaflowError):
    """A quality gate refused the data (a failed expectation); outputs for inspection exist."""

    exit_code = EXIT_GATE


class PromotionRefused(CoaflowError):
    """The register stage decided not to promote. ``result`` is the stage's complete result (the
    runner records it and marks the stage done: a refusal is a decision, not a crash)."""

    exit_code = EXIT_PROMOTION

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result


class ServiceUnavailable(CoaflowError):
    """An endpoint, registry or tracking server did not answer in time: retry later."""

    exit_code = EXIT_RETRY


def os_failure(e: OSError, where: str) -> CoaflowError:
    """An ``OSError`` met while reading or writing ``where`` as the one-line error a user acts
    on: a full disk or quota is worth a retry once space is freed (75); a read-only file system,
    a missing permission, a symlink loop or a path that is not what it should be is bad input (2).

    >>> import errno
    >>> e = os_failure(OSError(errno.ENOSPC, "No space left on device"), "/out")
    >>> type(e).__name__, str(e)
    ('ServiceUnavailable', '/out: the disk is full (No space left on device): free space and retry')
    """
    import errno

    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ServiceUnavailable(f"{where}: the disk is full ({reason}): free space and retry")
    return UserError(f"{where}: {reason}")


def exit_code(exc: BaseException) -> int:
    """The exit code for ``exc``: its own for coaflow errors, 1 (a bug) for anything else (a
    library error that means bad input is turned into a ``UserError`` where it is raised).

    >>> exit_code(GateRefused("x")), exit_code(ServiceUnavailable("x")), exit_code(KeyError("x"))
    (3, 75, 1)
    """
    if isinstance(exc, CoaflowError):
        return exc.exit_code
    return EXIT_BUG
