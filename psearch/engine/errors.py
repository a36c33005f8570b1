"""The one error type a user can cause (printed as one line, exit code 2, nothing changed), and the
exit codes by which a worker tells its launcher why it ended."""


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
