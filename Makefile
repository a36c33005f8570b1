# The two commands a new machine needs:  make demo  (set up + a small search)  and  make test.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean-demo

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python parallel_search.py --demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean-demo:
	rm -rf demo_data demo_runs
