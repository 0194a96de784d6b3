"""The errors a run can end with, and the exit code an orchestrator acts on for each.

=====  ======================  ==============================================================
code   exception               meaning (what Airflow / KFP / a shell script should do)
=====  ======================  ==============================================================
0      -                       done (a cached stage counts as done)
1      anything else           a bug in coaflow or a library: do not retry, read the traceback
2      ``UserError``           bad config, bad file, bad argument: fix the input, do not retry
3      ``GateRefused``         a data quality gate refused the batch: look at the quarantine
4      ``PromotionRefused``    the candidate did not beat the champion: nothing moved; the run
                               itself succeeded, and later stages that need a promotion are skipped
75     ``ServiceUnavailable``  an endpoint or the tracking server was unreachable or timed out:
                               worth a retry (75 is EX_TEMPFAIL of sysexits.h)
=====  ======================  ==============================================================

Every message is one line meant to be shown as is: it names the file, field or URL at fault.
"""

from __future__ import annotations

from typing import Any

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_GATE, EXIT_PROMOTION, EXIT_RETRY = 0, 1, 2, 3, 4, 75
RETRYABLE_EXIT_CODES = (EXIT_RETRY,)


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
