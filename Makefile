# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean
setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints-cpu.txt scripts/setup_env.sh scripts/patch_cuda_wheels.py
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vlrlhf demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -p no:cacheprovider --durations=40

clean:
	rm -rf $(VENV) .demo
