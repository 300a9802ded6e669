# Set-up is two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cosyvoiced.dev.toml

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system

.PHONY: venv run test lint bench dist deb install clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "cosyvoiced needs Python >= 3.11 (found: $$($(PYTHON) --version))"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "could not create $(VENV): on Debian, 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

run: venv
	$(BIN)/cosyvoiced --config $(CONFIG)

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	@touch $@

# Lint first: what is not ruff- and mypy-clean does not pass CI either.
test: lint
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check cosyvoiced tests bench
	$(BIN)/mypy

bench: venv
	$(BIN)/python bench/dropfolder.py

dist: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet build
	$(BIN)/python -m build --outdir dist .

deb:
	packaging/build-deb.sh dist

# Without the Debian package: a virtualenv in $(PREFIX)/lib/cosyvoiced/venv, the commands in
# $(PREFIX)/bin, the unit, sysusers and tmpfiles entries, and the config (kept if present).
install:
	packaging/install.sh "$(DESTDIR)" "$(PREFIX)" "$(SYSCONFDIR)" "$(UNITDIR)"

clean:
	rm -rf $(VENV) build dist *.egg-info var
