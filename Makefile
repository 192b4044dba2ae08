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

demo: venv
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m gbcosface.demo_loss

clean:
	rm -rf $(VENV) output runs .pytest_cache
