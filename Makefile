# The habits: `make test`, `make demo`, `make lint`, `make bench`.
# Each target sets up what it needs on a fresh machine: Debian packages (unixODBC, as root),
# the virtualenv with the project and its tools, and the Go build of the sandbox control plane.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint format bench bench-quick sandbox-build tools-build images system-deps venv up down clean

test: system-deps $(STAMP) sandbox-build tools-build images
	$(PY) -m pytest $(PYTEST_ARGS)

demo: system-deps $(STAMP) sandbox-build tools-build images
	$(PY) -m sandbox.demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The recorded run of docs/benchmarks.md: onboarding at N = 100, 500, 1000 against the one-shot
# way (and at N = 100 on managed identities), the fleet of 1000 at rest, restarted and churned,
# the workload's latency, a pool onboarding 1000 namespaces over two clusters and 5000 resources
# on pools at rest and restarted; then the PNG. About 80 minutes on 2 cores. Writes
# bench/results/full-*.json and docs/benchmarks.png.
bench: system-deps $(STAMP) sandbox-build
	$(PY) bench/controlplane.py --runs 1
	$(PY) bench/onboarding.py --n 100 --n 500 --n 1000 --name full-onboarding-app
	$(PY) bench/onboarding.py --kind mi --n 100 --name full-onboarding-mi
	$(PY) bench/fleet.py --n 1000 --name full-fleet-app-1000
	$(PY) bench/workload.py --rounds 50 --name full-workload
	$(PY) bench/tokenless_pods.py --deployments 10 --replicas 2 --name full-tokenless-pods
	$(PY) bench/pools.py --namespaces 1000 --clusters 2 --at-rest 5000 --name full-pools
	$(PY) bench/plot.py

# The same kinds of measurement, smaller (about 15 minutes): results under bench/results/.
bench-quick: system-deps $(STAMP) sandbox-build
	$(PY) bench/onboarding.py --n 100
	$(PY) bench/fleet.py --n 200 --control 30 --steady 120 --restart-window 60 --probe-window 120 --churn-minutes 2
	$(PY) bench/workload.py --rounds 50
	$(PY) bench/plot.py --onboarding bench/results/onboarding-app.json --fleet bench/results/fleet-app-200.json --out bench/results/benchmarks.png

sandbox-build: $(STAMP)
	$(PY) -m sandbox build

# The CLI tools only the tests use (helm for the chart tests, gitops-health for kstatus/Argo CD), built from Go modules and cached.
tools-build: $(STAMP)
	$(PY) -m sandbox build --tools

# The operator and workload images from their Dockerfiles (buildah, no daemon, no registry):
# docker archives cached under ~/.cache/swi-sandbox/images-<hash of the inputs>/ (docs/deploy.md).
images: system-deps $(STAMP)
	$(PY) -m sandbox images

up: system-deps $(STAMP) sandbox-build
	$(PY) -m sandbox up

down: $(STAMP)
	$(PY) -m sandbox down

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python 3.11+ is required (found %s); set PYTHON=python3.11" % sys.version.split()[0])'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The Debian packages the sandbox needs, installed when run as root (otherwise the error names
# them): unixODBC is what pyodbc loads the Microsoft ODBC Driver 18 through; the node needs
# libseccomp-dev and pkg-config (runc is built with seccomp), Debian's CNI plugins, iptables and
# iproute2 (its network namespace); buildah and mmdebstrap build the images without a daemon;
# libjemalloc2 is the operator's allocator (operator/swi_operator/heap.py).
DEBS := unixodbc libodbc2 odbcinst libjemalloc2 libseccomp-dev pkg-config containernetworking-plugins \
	iptables iproute2 buildah mmdebstrap
system-deps:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: "$$missing; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "error: Debian packages missing: "$$missing": run 'sudo apt-get install "$$(echo $$missing)"' and retry (or run as root)" >&2; exit 2; \
	  fi; \
	fi

clean:
	-$(PY) -m sandbox down
	rm -rf .sandbox .mypy_cache .ruff_cache .pytest_cache
