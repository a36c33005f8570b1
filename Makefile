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

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The CPU benchmarks (about 15 minutes on 2 cores): writes bench/RESULTS.md. On a machine with a
# GPU, also run bench/gpu_check.sh.
bench: $(STAMP)
	$(VENV)/bin/python bench/run_all.py

clean-demo:
	rm -rf demo_data demo_runs

# The servers the cluster tests start themselves (PostgreSQL, MariaDB, a one-machine SLURM);
# without them those tests are skipped with the reason. Debian/Ubuntu, as root.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql mariadb-server slurm-wlm munge; } \
		|| echo "system-deps: install failed; the database and SLURM tests will be skipped"; \
	else echo "system-deps: needs root and apt-get; the database and SLURM tests will be skipped"; fi
