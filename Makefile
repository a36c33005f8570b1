# The two commands a new machine needs:  make demo  (set up + a small search)  and  make test.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-demo system-deps bench

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python parallel_search.py --demo

# -rfEs: the summary lists failures, errors and each skip with its reason (a missing server,
# no GPU), so that no skip goes unseen.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -rfEs

# The CPU benchmarks (about 25 minutes on 2 cores): writes bench/RESULTS.md. On a machine with a
# GPU, also run bench/gpu_check.sh.
bench: $(STAMP)
	$(VENV)/bin/python bench/run_all.py

clean-demo:
	rm -rf demo_data demo_runs

# The servers the cluster tests start themselves (PostgreSQL, MariaDB, a one-machine SLURM), and
# faketime for the clock tests; without them those tests are skipped with the reason. Debian/Ubuntu, as root. Under CI (CI=true)
# those tests fail without their servers instead (tests/conftest.py), and so does this target when
# it cannot install them: the first error then says why.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql mariadb-server slurm-wlm munge faketime \
		&& exit 0; why="install failed"; \
	else why="needs root and apt-get"; fi; \
	if [ "$$CI" = true ]; then \
		echo "system-deps: $$why (CI=true: the database and SLURM tests would fail)" >&2; exit 1; fi; \
	echo "system-deps: $$why; the database and SLURM tests will be skipped"
