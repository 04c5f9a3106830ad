# pvebackup: two commands do everything on a fresh Debian 12 machine:
#   make demo   - sample VM + container: backup, change, incremental backup, restore, compare
#   make test   - lint and the whole test suite
# Both install what is missing first (Debian packages via apt, Python packages in .venv/).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

# Debian packages the project runs on (see docs/design.md, "Real components").
DEB_PACKAGES := qemu-utils qemu-system-common qemu-system-x86 python3-libnbd libnbd-bin nbdkit \
	nbdkit-plugin-python zstd python3-venv rsync acl attr tar
# Peers measured by `make bench` only.
BENCH_PACKAGES := borgbackup restic hyperfine

.PHONY: setup deps test lint demo bench clean

setup: $(STAMP)

# apt-get update runs only when something is missing, so a set-up machine stays offline.
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The venv is made from Debian's Python with --system-site-packages: libnbd's Python
# bindings (`import nbd`) exist only as the Debian package python3-libnbd, built for
# Debian's /usr/bin/python3. Pip packages installed into the venv shadow system ones.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory deps
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import nbd' 2>/dev/null; then \
		rm -rf $(VENV) && /usr/bin/python3 -m venv --system-site-packages $(VENV); fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c 'import nbd, pvebackup.api, pvebackup.storage'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy src examples/plainfiles/src

test: setup lint
	$(VENV)/bin/pytest -q

# DEMO_ARGS=--keep keeps the sample node; --dir DIR uses DIR.
DEMO_ARGS ?=
demo: setup
	$(PY) -m pvebackup.demo $(DEMO_ARGS)

bench: setup
	@missing=""; for p in $(BENCH_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	$(PY) -m bench

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
