# Two entry points (see README): `make run` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
ARGS ?= --out build/default-lm.inferpass --force

.PHONY: run test clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 is pinned; pip takes the CPU wheel from this machine's wheel folder.
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/optimize-model $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
