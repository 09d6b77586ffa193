# Every target sets itself up: a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peftlab-installed
# torch first, pinned to the CPU build that pip finds locally here; anything newer than 2.14.1 is refused.
TORCH  ?= torch==2.13.0

.PHONY: setup test demo bench bench-methods lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/peftlab demo

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/profile_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/profile_step.py --method full

# the methods table on MiniLM + SST-2 (needs ../shared/data/sst2; about 30 min on 2 cores)
bench-methods: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/methods_table.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
