# Two entry points for a fresh machine (Python 3.11 with pip, nothing else):
#   make run   - create .venv, install sigclassd (the base: no TensorFlow), serve the bundled
#                model on loopback
#   make test  - create .venv, install sigclassd with its test extra, the training package
#                (models/: TensorFlow) and the benchmark package (bench/), and the OS packages the
#                tests need (prometheus, promtool), run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test lint venv os-deps bench clean dist

# The venv's own pip (23.0 on Debian 12) installs pyproject projects and editables; upgrading it first
# cost make run 6 s and a download.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Two stamps: serving needs only the base; the suite needs the base with its test extra, the
# training package (models/pyproject.toml) and the benchmark package (bench/pyproject.toml), all
# editable and in one pip call, so that pip takes sigclassd and sigclassd-train from the checkout.
# The full install includes the base, so it refreshes both stamps.
$(VENV)/.installed-base: pyproject.toml $(BIN)/python
	@echo "installing sigclassd (serving only, no TensorFlow) into $(VENV)"
	$(BIN)/pip install --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-all: pyproject.toml models/pyproject.toml bench/pyproject.toml $(BIN)/python
	@echo "installing sigclassd with its test extra, sigclassd-train and sigclassd-bench into $(VENV) (TensorFlow: a few minutes the first time)"
	$(BIN)/pip install --disable-pip-version-check -e '.[test]' -e ./models -e ./bench
	touch $@ $(VENV)/.installed-base

venv: $(VENV)/.installed-all

run: $(VENV)/.installed-base
	$(BIN)/sigclassd run $(ARGS)

# The three wheels, to install anywhere with pip (the README's Install section):
#   pip install dist/sigclassd-VERSION-py3-none-any.whl         serving only
#   pip install dist/sigclassd_train-VERSION-py3-none-any.whl   adds train and eval, with TensorFlow
#   pip install dist/sigclassd_bench-VERSION-py3-none-any.whl   adds bench (needs the train wheel too)
# setuptools packages whatever an earlier build left in build/: start from none.
dist: $(BIN)/python
	rm -rf dist build models/build bench/build
	$(BIN)/pip wheel --disable-pip-version-check --no-deps --wheel-dir dist . ./models ./bench
	@ls dist/*.whl

# Debian packages the tests use: a real Prometheus and promtool, systemd-analyze for the unit
# checks, a C compiler with libzmq for the C gateway example, and for the real-systemd test
# systemd-nspawn (systemd-container), nsenter/unshare (util-linux), Debian's python3-venv
# (the units' venv must come from a system interpreter), curl for the README's first-minute block, and
# etcd-server for the cluster tests (they start their own etcd on free ports).
OS_PACKAGES := prometheus systemd libzmq3-dev pkg-config gcc systemd-container util-linux python3-venv curl etcd-server
# The image and multi-host tests: podman with runc, debootstrap for a local base image,
# systemd-nspawn and nftables for the simulated hosts, dnsname so that compose services
# find each other by name on podman's CNI network, catatonit for podman kube play's pods (deploy/k8s).
IMAGE_PACKAGES := podman runc debootstrap systemd-container nftables iproute2 golang-github-containernetworking-plugin-dnsname \
                  catatonit

os-deps:
	@missing=$$(for p in $(OS_PACKAGES) $(IMAGE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Style and types before the suite: ruff with the rules in pyproject.toml, mypy on the three source roots.
lint: venv
	$(BIN)/ruff check daemon models bench
	$(BIN)/mypy daemon/sigclassd models/sigclassd bench/sigclassd

# One test at a time by default. PYTEST_WORKERS=2 runs two at once (most tests wait on real daemons,
# hosts and timers): host-building modules then run one after another and drills that time the daemon under
# load (marked solo) run alone (tests/conftest.py), but on two cores the other worker's set-up work (a
# container booting, a model building) still slows the timing drills, and some fail.
PYTEST_WORKERS ?= 0
test: venv os-deps lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=20 $(PYTEST_ARGS)

bench: venv os-deps
	$(BIN)/sigclassd bench $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info models/build models/*.egg-info bench/build bench/*.egg-info
