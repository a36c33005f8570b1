"""Summarise a search: plots, tables, a report, and best_overall/ with the best trial's files.

    python summarize.py --checkpoint_dir C [--storage URL --study_name S]

Safe while the search runs. The code is psearch/reports/ (installed: `summarize-search`).
"""
import sys

if __name__ == "__main__":  # first of all: a password typed in --storage leaves `ps` at once
    from psearch.engine import urls

    urls.hide_url_passwords(sys.argv[1:])

from psearch.reports.summary import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
