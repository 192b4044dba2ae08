# `make test` and `make demo` each create .venv when it is missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,deepspeed,dali,fastjpeg
comma := ,
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(subst /,_,$(subst =,_,$(TORCH_SPEC)))-$(subst $(comma),_,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: test test-fast demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch goes in first: an unpinned one resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $@

# Everything, the `slow` checks included (this is what CI runs).
test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Quick loop while developing: skips the tests marked `slow`.
test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Synthetic identities (made once), then 2 gloo ranks train configs/demo_cpu.toml from scratch
# and print held-out verification before and after training.
demo: venv
	@test -f data/synthetic/train.rec -a -f data/synthetic/synth_val.bin || \
		$(PY) -m gbcosface.data.synthetic --out data/synthetic
	rm -rf output/demo
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 \
		train_dist.py --config configs/demo_cpu.toml

clean:
	rm -rf $(VENV) output runs .pytest_cache
