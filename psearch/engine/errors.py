"""How things end, in one place: the one error type a user can cause (printed as one line, exit
code 2, nothing changed), every exit code (a worker's, by which it tells its launcher why it
ended, and a run's), and every reason the search itself gives a trial it ends (`FailReason`; a
trial whose objective raised gets the exception's own words instead)."""
from __future__ import annotations

import enum
import signal


class UsageError(ValueError):
    """A bad command-line value or input: the message names it and the fix."""


class DeviceUnavailable(UsageError):
    """This process was pinned to a GPU that CUDA cannot use: it must not train on the CPU (a
    worker exits EXIT_NO_DEVICE; elsewhere it is the usual one-line error)."""


# A run of trials failing on their own merits (not interrupts) means something is wrong with the
# setup (out of memory at any size, a broken objective): the worker stops instead of burning the
# budget (EXIT_TOO_MANY_FAILURES).
MAX_CONSECUTIVE_FAILURES = 5

EXIT_OK = 0  # no budget left for this worker to start a trial
EXIT_USAGE = 2  # bad arguments: the whole run stops
EXIT_TOO_MANY_FAILURES = 3  # trials kept failing on their own merits: the slot stops
EXIT_NO_DEVICE = 4  # pinned to a GPU that CUDA cannot use: the slot stops, never trains on the CPU
EXIT_TRIAL_TIMEOUT = 5  # its trial ran past --trial_timeout: the launcher kills the group, restarts
EXIT_DISK_FULL = 6  # no space left on the device: the run stops cleanly
EXIT_STORAGE = 7  # the study stayed unreachable through a whole outage: restarted once it answers
EXIT_FAILED = 1  # a run that did not reach its budget (a disk full, workers that gave up, ...)



class WorkerEnd(str, enum.Enum):
    """What a worker's exit code tells its launcher."""

    DONE = "done"  # no budget left for it to start a trial
    USAGE = "usage"
    FAILURES = "failures"  # something is wrong with the setup
    NO_DEVICE = "no_device"
    TIMEOUT = "timeout"
    DISK_FULL = "disk_full"
    STORAGE = "storage"  # it gave up on an unreachable study
    DIED = "died"  # any other code, or killed by a signal


# The one table of worker exit codes.
WORKER_EXITS = {EXIT_OK: WorkerEnd.DONE, EXIT_USAGE: WorkerEnd.USAGE,
                EXIT_TOO_MANY_FAILURES: WorkerEnd.FAILURES, EXIT_NO_DEVICE: WorkerEnd.NO_DEVICE,
                EXIT_TRIAL_TIMEOUT: WorkerEnd.TIMEOUT, EXIT_DISK_FULL: WorkerEnd.DISK_FULL,
                EXIT_STORAGE: WorkerEnd.STORAGE}
# A run ended by a signal, in words (the final report's).
SIGNAL_WORDS = {signal.SIGHUP: "terminal closed", signal.SIGINT: "interrupted",
                signal.SIGTERM: "terminated"}


def signal_exit(signum: int) -> int:
    """The exit code of a run ended by signal `signum`: 128 + its number, as shells report a
    signalled process (130 SIGINT, 143 SIGTERM, 129 SIGHUP) (pure)."""
    return 128 + int(signum)


def classify_exit(returncode: int) -> WorkerEnd:
    """What a worker's exit code means (pure)."""
    return WORKER_EXITS.get(returncode, WorkerEnd.DIED)


class FailReason(str, enum.Enum):
    """Why the search ended a trial as FAIL (its `fail_reason` user attribute)."""

    INTERRUPTED = "interrupted"  # a stop (Ctrl+C, SIGTERM) ended it: it runs again
    STORAGE_LOST = "storage_unreachable"  # the study stayed unreachable longer than it waited
    WORKER_DIED = "worker_died"  # its worker died under it: it runs again
    CRASHED = "crashed"  # its owner on this host no longer exists: it runs again
    STALE = "stale"  # its heartbeat stopped (another host died): it runs again
    TIMEOUT = "timeout"  # it ran past --trial_timeout: not retried
    DISK_FULL = "No space left on device"  # it filled the disk: the run stops
    TAKEN_OVER = "taken_over"  # never stored: another launcher ended it and runs it again

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


# Trials failed for these reasons did not fail on their own merits: they run again.
RETRYABLE_REASONS = frozenset(r.value for r in (
    FailReason.INTERRUPTED, FailReason.STORAGE_LOST, FailReason.WORKER_DIED, FailReason.CRASHED,
    FailReason.STALE))
# ... and these are not even attempts: the trial itself had no part in them.
NOT_ATTEMPTS = frozenset({FailReason.INTERRUPTED.value, FailReason.STORAGE_LOST.value})
