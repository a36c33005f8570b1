"""The argument parser of every command: on a bad flag, the one line that matters and where to
look, not forty lines of usage.

    usage: parallel_search.py --data_root D --checkpoint_dir C --n_trials N [options]
    error: argument --n_trials: invalid int value: 'x'
    (run parallel_search.py --help for every flag)
"""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from psearch.engine.errors import EXIT_USAGE


class Parser(argparse.ArgumentParser):
    """argparse with a short usage line; `--help` still lists every flag."""

    def __init__(self, *args, short_usage: str = "[options]", **kwargs):
        super().__init__(*args, **kwargs)
        self.short_usage = short_usage

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(short_error(self.prog, self.short_usage, message))
        sys.exit(EXIT_USAGE)


def short_error(prog: str, short_usage: str, message: str) -> str:
    """The three lines a bad flag prints (pure)."""
    return (f"usage: {prog} {short_usage}\nerror: {message}\n"
            f"(run {prog} --help for every flag)\n")
