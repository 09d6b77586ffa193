# Every target sets itself up: a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peftlab-installed
# torch first, pinned to the CPU build that pip finds locally here; anything newer than 2.14.1 is refused.
TORCH  ?= torch==2.13.0

.PHONY: setup test demo bench bench-allocator bench-methods lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
test: setup
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/peftlab demo

bench: setup bench-allocator
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/profile_step.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/profile_step.py --method full

# bench/RESULTS.md is measured on tcmalloc, which `peftlab train` preloads where installed: install it where this
# machine allows (root with apt-get); elsewhere say so, and the run measures the allocator it finds
bench-allocator:
	@ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make bench: installing libtcmalloc-minimal4 (the allocator bench/RESULTS.md is measured on)"; \
		apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 || \
		{ apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null; }; \
	else \
		echo "make bench: tcmalloc is not installed (apt install libtcmalloc-minimal4): peftlab runs on" \
			"$$($(BIN)/python -c 'import os; from peftlab.accel.allocator import ENV, choose_library as c; print(c(os.environ.get(ENV, "auto")) or "the system allocator")')"; \
	fi

# the methods table on MiniLM + SST-2 (needs ../shared/data/sst2; about 30 min on 2 cores)
bench-methods: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/methods_table.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
