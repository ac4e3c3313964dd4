# Two entry points for a fresh machine (Python 3.11 with pip, nothing else):
#   make run   - create .venv, install sigclassd, serve the bundled model on loopback
#   make test  - create .venv, install sigclassd with test extras and the OS packages the
#                tests need (prometheus, promtool), run the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: run test venv os-deps bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	@echo "installing sigclassd and its dependencies into $(VENV) (TensorFlow: a few minutes the first time)"
	$(BIN)/pip install --disable-pip-version-check -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/sigclassd run $(ARGS)

# Debian packages the tests use: a real Prometheus and promtool, systemd-analyze for the unit
# checks, and a C compiler with libzmq for the C gateway example.
OS_PACKAGES := prometheus systemd libzmq3-dev pkg-config gcc

os-deps:
	@missing=$$(for p in $(OS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: venv os-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/sigclassd bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
