# esmjax: the two quick-start commands are `make train` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

.PHONY: venv lint format test train finetune clean device-wheels

# (Re)install when pyproject.toml changes. `make train` and `make finetune` need the package and the
# CPU build of JAX only (extra cpu; RUN_STAMP); `make test` adds the test extra (STAMP), which pins a
# CPU build of torch (an unpinned torch would pull a multi-GB CUDA build) and also satisfies RUN_STAMP.
# On a GPU node or TPU VM install '.[cuda12]' / '.[tpu]' instead (README "Install on a GPU cluster / a
# TPU VM").
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu]"
	touch $(RUN_STAMP)

# The tests also compile for accelerators without one (README "Plans by the accelerators'
# compilers"): libtpu comes with the tpu extra; the GPU compiler (pyproject's aot-gpu extra, these
# pins) goes aside into $(AOT_GPU_DIR), put on PYTHONPATH only by the tests that compile for a GPU,
# since on a machine without a GPU the CUDA plugin logs from every JAX process that loads it.
AOT_GPU := jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 nvidia-cuda-nvcc-cu12==12.9.86
AOT_GPU_DIR := $(VENV)/aot-gpu

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test,tpu]"
	rm -rf $(AOT_GPU_DIR)
	$(PY) -m pip install -q --no-deps --target $(AOT_GPU_DIR) $(AOT_GPU)
	touch $(STAMP) $(RUN_STAMP)

venv: $(STAMP)

# Style gate (ruff, 100 columns; settings in pyproject.toml). CI runs it first, through `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check esmjax tests tools
	$(VENV)/bin/ruff format --check esmjax tests tools

format: $(STAMP)
	$(VENV)/bin/ruff check --fix esmjax tests tools
	$(VENV)/bin/ruff format esmjax tests tools

# Two pytest-xdist workers, a test file per worker at a time (module fixtures built once); the
# test run's processes share a JAX compilation cache (tests/conftest.py). Slow tests: pytest -m slow.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Trains the demo ESM-2 on the bundled CATH S20 sample on every local device; run again to resume.
DEMO_DATA := runs/data/cath_s20
$(DEMO_DATA): | $(RUN_STAMP)
	$(VENV)/bin/esmjax data build --fasta data/cath_s20.fa.gz --out $(DEMO_DATA) --val-fraction 0.05

train: $(RUN_STAMP) $(DEMO_DATA)
	$(VENV)/bin/esmjax train --config configs/demo.yaml --workdir runs/demo

# Wheels for tools/device_check.sh on an accelerator image without internet (README "Device check"):
# the pinned data/training packages and all their dependencies, for the image's Python (DEVICE_PY)
# on x86_64 Linux. promise (a tensorflow-datasets dependency) exists only as an sdist: built here.
DEVICE_PY      ?= 3.12
DEVICE_WHEELS  ?= device_wheels
DEVICE_REQS    := grain==0.2.18 array-record==0.8.6 tensorflow-datasets==4.9.10 tensorboardX==2.6.5
DEVICE_PLATFORMS := $(foreach p,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(p)_x86_64) --platform any
device-wheels: $(STAMP)
	rm -rf $(DEVICE_WHEELS) && mkdir -p $(DEVICE_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w $(DEVICE_WHEELS) promise==2.3
	$(PY) -m pip download -q --only-binary=:all: --python-version $(DEVICE_PY) --implementation cp \
	  $(DEVICE_PLATFORMS) --find-links $(DEVICE_WHEELS) -d $(DEVICE_WHEELS) $(DEVICE_REQS)
	printf '%s\n' $(DEVICE_REQS) > $(DEVICE_WHEELS)/requirements.txt

# Fine-tunes the demo ESM-2 (runs/demo; trained first when absent) on the bundled TEM-1 DMS (LoRA, regression),
# then prints the test Spearman/Pearson/RMSE next to the training-mean baseline's. Run again to resume.
runs/demo/config.json:
	$(MAKE) train

finetune: $(RUN_STAMP) runs/demo/config.json
	$(VENV)/bin/esmjax finetune --config configs/finetune/sequence_regression.yaml --workdir runs/finetune_tem1

clean:
	rm -rf $(VENV) runs
