# finetune: `make train` and `make test` install what they need into .venv/ first.
#
#   make train                                   # the embedded tiny recipe, offline, on CPU, ~2 minutes
#   make train RECIPE=recipes/qlora_int4.yaml ARGS="--max_steps 100"
#   make test

VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
RECIPE   ?= recipes/tiny.yaml
ARGS     ?=
# accelerate picks up the machine's default config (`accelerate config`) or a file passed here.
LAUNCH   ?= $(VENV)/bin/accelerate launch
PYTEST_ARGS ?=

.PHONY: install train test lint clean

install: $(VENV)/.installed

# Re-installs when requirements.txt changes. torch is installed first and on its own, pinned, so the resolver
# never swaps in a CUDA build on a machine without a GPU (see launch/install.sh).
$(VENV)/.installed: requirements.txt launch/install.sh
	VENV=$(VENV) bash launch/install.sh
	touch $@

train: install
	$(LAUNCH) finetune/run.py $(RECIPE) $(ARGS)

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: install
	$(PYTHON) -m ruff check finetune tests

clean:
	rm -rf outputs wandb assets .pytest_cache
