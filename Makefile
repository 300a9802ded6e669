# Set-up is two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= etc/cosyvoiced.dev.toml

PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system

LANE := .venv-cosyvoice
LANE_BIN := $(LANE)/bin
PIPECAT := .venv-pipecat
PIPECAT_BIN := $(PIPECAT)/bin

.PHONY: venv run test test-cosyvoice test-cosyvoice-checkout test-pipecat lint redis browser bench dist deb install clean

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

# Lint first: what is not ruff- and mypy-clean does not pass CI either. Every test starts
# its own daemons on its own spool and ports, so the suite runs in TEST_JOBS processes
# (pytest-xdist; a file's tests stay in one process, for the daemons they share), handed out
# in the order collected: tests/conftest.py puts the longest files first, which xdist's
# default (most tests first) would start last. The few that hold a tight bound on wall time
# (`serial`) then run alone.
TEST_JOBS ?= auto
PYTEST_PARALLEL = -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder
# The slowest tests, printed at the end of each run: where CI's minutes go.
PYTEST_TIMES = --durations=15
# The console's browser tests write a screenshot of each view here (kept out of git).
SCREENSHOTS := screenshots
TEST_ENV = COSYVOICED_SCREENSHOTS=$(abspath $(SCREENSHOTS))

# The package's bytecode is written once first: where PYTHONDONTWRITEBYTECODE is set (it is
# on the development machines) every daemon the suite starts compiled it again, 0.2 s of CPU each.
test: lint redis browser
	$(BIN)/python -m compileall -q cosyvoiced
	$(TEST_ENV) $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_TIMES) \
		-m 'not serial and not pipecat' --ignore=tests/cosyvoice
	$(TEST_ENV) $(BIN)/python -m pytest -m serial --ignore=tests/cosyvoice
	$(MAKE) test-pipecat
	$(MAKE) test-cosyvoice

# Pipecat's ElevenLabs service against the daemon, in a virtualenv of its own: pipecat-ai
# pins soundfile and soxr older than the daemon's, and the main suite runs on what an install
# of the daemon gets. Here the daemon runs on pipecat's pins, which its own ranges allow.
$(PIPECAT)/.installed: setup.cfg pyproject.toml
	@test -x $(PIPECAT_BIN)/python || $(PYTHON) -m venv $(PIPECAT)
	$(PIPECAT_BIN)/python -m pip install --quiet --upgrade pip
	$(PIPECAT_BIN)/python -m pip install --quiet -e '.[test,test-pipecat]'
	@touch $@

test-pipecat: $(PIPECAT)/.installed
	$(PIPECAT_BIN)/python -m pytest -m pipecat --ignore=tests/cosyvoice

# The CosyVoice lane: a virtualenv of its own with torch and the real upstream inference
# code from PyPI (cosyvoice-package 0.0.3 = upstream v1 at f65eca6, matcha-tts-package), run
# on a tiny random model built at test time. torch/torchaudio 2.11 are PyPI's CUDA builds,
# which run on CPU; the three packages installed --no-deps pin stale versions of their needs.
# COSYVOICE_REPO=/path/to/CosyVoice runs the same tests on an upstream checkout (CosyVoice2).
# Its tests run in parallel too (each process builds its own tiny model), so none may
# depend on another's having run first.
$(LANE)/.installed: setup.cfg pyproject.toml
	@test -x $(LANE_BIN)/python || $(PYTHON) -m venv $(LANE)
	$(LANE_BIN)/python -m pip install --quiet --upgrade pip
	$(LANE_BIN)/python -m pip install --quiet torch==2.11.0 torchaudio==2.11.0
	$(LANE_BIN)/python -m pip install --quiet --no-deps cosyvoice-package==0.0.3 \
		matcha-tts-package==0.0.3 openai-whisper==20250625
	$(LANE_BIN)/python -m pip install --quiet -e '.[cosyvoice,test]' tiktoken more-itertools numba
	@touch $@

test-cosyvoice: $(LANE)/.installed
	$(LANE_BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_TIMES) tests/cosyvoice

# The same lane on an upstream checkout, once per model generation (tiny CosyVoice-300M,
# CosyVoice2, CosyVoice3): make test-cosyvoice-checkout COSYVOICE_REPO=/path/to/CosyVoice.
# What current upstream imports (gdown, wget, modelscope, x-transformers, torchcodec) comes
# from the cosyvoice extra the lane installs, as the README says, and nothing by hand: this
# run is the proof of that recipe. torchaudio.load also needs FFmpeg's libraries.
# Not part of `make test`: CI has no checkout.
test-cosyvoice-checkout: $(LANE)/.installed
	@test -d "$(COSYVOICE_REPO)/cosyvoice" || \
		{ echo "COSYVOICE_REPO: set it to a FunAudioLLM/CosyVoice checkout"; exit 1; }
	@command -v ffmpeg >/dev/null || \
		{ echo "torchaudio.load needs FFmpeg: apt-get install ffmpeg"; exit 1; }
	for version in 1 2 3; do \
		COSYVOICE_REPO=$(abspath $(COSYVOICE_REPO)) COSYVOICE_VERSION=$$version \
			$(LANE_BIN)/python -m pytest tests/cosyvoice || exit 1; \
	done

# The GPU check, on an NVIDIA host (not part of `make test`): the gpu-marked tests, the
# CosyVoice lane with its daemons' workers on $(GPU_DEVICE), fp16 off and on, then the
# full-size benchmark (daemon vs direct, fp16 off and on); the figures are the JSON the tests
# and the benchmark print. With COSYVOICE_REPO=/path/to/CosyVoice the lane and the benchmark
# run CosyVoice2 on upstream's code (needs FFmpeg); the PyPI package (v1) has no fp16 switch.
# The virtualenv sees the host's packages, so a CUDA torch already there is used. Offline:
# `make gpu-wheels WHEELS=dir` on a connected machine with the same Python and platform,
# copy dir over, then `make test-gpu WHEELS=dir` installs from it alone.
GPU_VENV := .venv-gpu
GPU_BIN := $(GPU_VENV)/bin
GPU_DEVICE ?= cuda:0
GPU_PIP = $(GPU_BIN)/python -m pip install --quiet \
	$(if $(WHEELS),--no-index --find-links $(abspath $(WHEELS)))
GPU_UPSTREAM := cosyvoice-package==0.0.3 matcha-tts-package==0.0.3 openai-whisper==20250625
# torch and torchaudio as the lane pins them (torchaudio 2.11 is the last release, and
# torchcodec 0.11 is built for torch 2.11); a host's own CUDA build of 2.11.0 satisfies it.
GPU_NEEDS := torch==2.11.0 torchaudio==2.11.0 tiktoken more-itertools numba
GPU_PROJECT := '.[cosyvoice,gpu,test]'
GPU_CHECKOUT = $(if $(COSYVOICE_REPO),COSYVOICE_REPO=$(abspath $(COSYVOICE_REPO)))
.PHONY: test-gpu gpu-wheels

$(GPU_VENV)/.installed: setup.cfg pyproject.toml
	@test -x $(GPU_BIN)/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_PIP) --no-deps $(GPU_UPSTREAM)
	$(GPU_PIP) $(GPU_NEEDS) -e $(GPU_PROJECT)
	@touch $@

test-gpu: $(GPU_VENV)/.installed
	@$(GPU_BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' || \
		{ echo "test-gpu: torch sees no CUDA device on this host"; exit 1; }
	$(GPU_BIN)/python -m pytest -m gpu tests -s
	for fp16 in 0 1; do \
		$(GPU_CHECKOUT) $(if $(COSYVOICE_REPO),COSYVOICE_VERSION=2) \
		COSYVOICE_DEVICE=$(GPU_DEVICE) COSYVOICE_FP16=$$fp16 \
			$(GPU_BIN)/python -m pytest tests/cosyvoice || exit 1; \
	done
	$(GPU_CHECKOUT) $(GPU_BIN)/python bench/cosyvoice.py --full-size --count 8 \
		$(if $(COSYVOICE_REPO),--version 2)

gpu-wheels:
	@test -n "$(WHEELS)" || { echo "gpu-wheels: WHEELS=dir names the directory to fill"; exit 1; }
	$(PYTHON) -m pip wheel --quiet --wheel-dir $(WHEELS) --no-deps $(GPU_UPSTREAM)
	$(PYTHON) -m pip wheel --quiet --wheel-dir $(WHEELS) setuptools wheel $(GPU_NEEDS) $(GPU_PROJECT)

# The cluster tests run a real redis-server on loopback (tests/redisserver.py); only its
# binary is needed. As root, Debian's package is installed when it is missing, with a
# policy-rc.d (if the host has none) so that its postinst starts no service, and on a systemd
# host the unit it enables is disabled again: nothing keeps running on port 6379, and the
# tests use free ports of their own. Not root: the cluster tests are skipped.
redis:
	@command -v redis-server >/dev/null && exit 0; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "redis-server is not installed (and this is not root to install it): the" \
			"cluster tests will be skipped; 'apt-get install redis-server' runs them"; \
		exit 0; \
	fi; \
	echo "installing Debian's redis-server for the cluster tests"; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e $$policy ]; then \
		trap 'rm -f '$$policy EXIT; printf '#!/bin/sh\nexit 101\n' >$$policy; chmod 755 $$policy; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends redis-server >/dev/null || exit 1; \
	if [ -d /run/systemd/system ]; then systemctl disable --now --quiet redis-server; fi; \
	redis-server --version

# The web console's browser tests (tests/test_console.py) drive Debian's chromium through
# Playwright pointed at it: Playwright's own browser downloads are never used. As root it is
# installed when missing, as redis-server is above; not root: those tests are skipped.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null && exit 0; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "chromium is not installed (and this is not root to install it): the" \
			"console's browser tests will be skipped; 'apt-get install chromium' runs them"; \
		exit 0; \
	fi; \
	echo "installing Debian's chromium for the console's browser tests"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium >/dev/null || exit 1; \
	chromium --version

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
	rm -rf $(VENV) $(LANE) $(PIPECAT) $(GPU_VENV) build dist *.egg-info var $(SCREENSHOTS)
