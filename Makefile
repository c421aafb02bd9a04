# Two entry points (see README): `make run` and `make test`. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
TEST_WORKERS ?= $(shell nproc)
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

# One pytest worker per core, each test module on one worker (its shared captures and compiled functions stay
# together); each worker's torch uses its share of the cores.
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info
