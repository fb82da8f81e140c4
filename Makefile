# `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on this machine kind; constraints.txt pins the rest.
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo demo-finetune test bench lint clean promtool chromium

$(VENV)/.installed-%: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP_INSTALL) -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-all
	$(VENV)/bin/genforge demo

# SFT + DPO from the pretrained demo model; pretrains it first (`make demo`) when runs/demo has none
demo-finetune: $(VENV)/.installed-all
	test -f runs/demo/model/config.json || $(VENV)/bin/genforge demo
	$(VENV)/bin/genforge demo --finetune

test: $(VENV)/.installed-all,dev promtool chromium
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q --durations=25

# promtool checks deploy/prometheus/alerts.yml (its test is skipped without it). Debian's `prometheus`
# package has it; installed only where apt-get runs as root, never a failure elsewhere.
promtool:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	   prometheus >/dev/null) ; } || echo "promtool not installed: the Prometheus rules test will be skipped"

# The console's browser tests drive Debian's chromium (a browser that Playwright downloads itself cannot
# be fetched on these machines); installed where apt-get runs as root, else those tests are skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	   chromium >/dev/null) ; } || echo "chromium not installed: the web console's browser tests will be skipped"

bench: $(VENV)/.installed-all,dev
	$(PY) benchmarks/lm_shakespeare.py

lint: $(VENV)/.installed-all,dev
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
