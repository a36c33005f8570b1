"""Write docs/FLAGS.md from the commands' own --help (tests/test_docs.py keeps it in step):

    python docs/make_flags.py
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (("parallel_search.py", "The launcher: one worker per GPU"),
            ("single_gpu_hyperparameter_search.py", "The sequential search (each worker runs it)"),
            ("summarize.py", "The summary, also while a search runs"))
WIDTH = "100"  # argparse wraps its help to $COLUMNS


def help_text(script: str) -> str:
    """`python SCRIPT --help` as a user sees it in a 100-column terminal."""
    env = {**os.environ, "COLUMNS": WIDTH}
    return subprocess.run([sys.executable, str(ROOT / script), "--help"], env=env, check=True,
                          capture_output=True, text=True, cwd=ROOT).stdout


def flags_markdown() -> str:
    """docs/FLAGS.md: each command's --help, as it prints it."""
    parts = ["# Flags\n", "Generated from each command's `--help` by `python docs/make_flags.py`; "
             "every flag's help states its default. Back to the [README](../README.md).\n"]
    for script, what in COMMANDS:
        parts += [f"\n## `{script}`\n", f"{what}.\n", "\n```text\n" + help_text(script) + "```\n"]
    return "".join(parts)


if __name__ == "__main__":
    (ROOT / "docs" / "FLAGS.md").write_text(flags_markdown())
