# pvebackup: two commands do everything on a fresh Debian 12 machine:
#   make demo   - sample VM + container: backup, change, incremental backup, restore, compare
#   make test   - lint and the whole test suite
# Both install what is missing first (Debian packages via apt, Python packages in .venv/,
# at the exact versions of constraints.txt). Prerequisites: apt-get install git make.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
CONSTRAINTS := constraints.txt

# Debian packages the project runs on (see docs/design.md, "Real components").
DEB_PACKAGES := qemu-utils qemu-system-common qemu-system-x86 python3-libnbd libnbd-bin nbdkit \
	nbdkit-plugin-python zstd python3-venv rsync acl attr tar
# A real S3 server (Ceph RADOS Gateway: mon + osd + rgw) that the S3 backend's tests
# start themselves (tests/s3fixture.py); installed without recommends (61 MB).
S3_PACKAGES := radosgw ceph-mon ceph-osd
# Storage tools the tests use for real (btrfs on a loop device; see docs/design.md,
# "Guest volumes on the storage types of real nodes"), and what the .deb test installs
# and runs with Debian's own python3 (tests/packaging/test_pkg_deb.py).
TEST_PACKAGES := btrfs-progs dpkg-dev python3-zstandard python3-cryptography
# The Perl tests (prove) of the Proxmox VE bridge; `make deb` builds the package.
PERL_PACKAGES := perl
DEBBUILD_PACKAGES := dpkg-dev
# Peers measured by `make bench` only.
BENCH_PACKAGES := borgbackup restic hyperfine

.PHONY: setup deps s3deps test lint perltest deb demo bench pins clean

setup: $(STAMP)

# Installs the Debian packages of $(1) that are missing ($(2): more apt-get options). apt-get update runs only
# then, so a set-up machine stays offline; and only then is root needed: anyone
# else gets the command to run instead of apt's "Permission denied".
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "make: these Debian packages are missing:$$missing" >&2; \
			echo "make: installing them needs root; run as root:" >&2; \
			echo "    apt-get install$$missing" >&2; \
			echo "make: (or: sudo apt-get install$$missing), then run make again" >&2; \
			exit 1; \
		fi; \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) $$missing; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PACKAGES))

s3deps:
	$(call apt_install,$(S3_PACKAGES),--no-install-recommends)

# The venv is made from Debian's Python with --system-site-packages: libnbd's Python
# bindings (`import nbd`) exist only as the Debian package python3-libnbd, built for
# Debian's /usr/bin/python3. Pip packages installed into the venv shadow system ones.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(MAKE) --no-print-directory deps
	@if [ ! -x $(PY) ] || ! $(PY) -c 'import nbd' 2>/dev/null; then \
		rm -rf $(VENV) && /usr/bin/python3 -m venv --system-site-packages $(VENV); fi
	$(PY) -m pip install -q -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) -c 'import nbd, pvebackup.api, pvebackup.storage'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy src examples/plainfiles/src

# Tests run on TEST_JOBS pytest-xdist workers (most wait on qemu, ceph and other
# subprocesses, so 2 workers nearly halve the time even on 2 cores); TEST_JOBS=0 runs
# them in one process. Tests marked `serial` run alone (tests/xdist_support.py).
TEST_JOBS ?= 2
test: setup s3deps lint perltest
	$(call apt_install,$(TEST_PACKAGES))
	$(VENV)/bin/pytest -q -n $(TEST_JOBS)

# The Perl storage plugins and backup provider against the real Python helper of this
# checkout (perl/t/*.t; the PVE base classes are stand-ins under perl/t/lib).
perltest: setup
	$(call apt_install,$(PERL_PACKAGES))
	PYTHONPATH=$(CURDIR)/src PVEBACKUP_TEST_PYTHON=$(abspath $(PY)) prove -I perl/t/lib -I perl perl/t

# build/deb/pvebackup_<version>_all.deb, by debian/rules (plain dpkg-dev, no debhelper;
# `dpkg-buildpackage -us -uc -b` runs the same rules and writes to ..).
deb:
	$(call apt_install,$(DEBBUILD_PACKAGES))
	rm -rf build/deb && mkdir -p build/deb
	debian/rules clean
	DEB_OUTDIR=build/deb debian/rules binary
	debian/rules clean
	@ls build/deb/*.deb

# DEMO_ARGS=--keep keeps the sample node; --dir DIR uses DIR.
DEMO_ARGS ?=
demo: setup
	$(PY) -m pvebackup.demo $(DEMO_ARGS)

bench: setup
	$(call apt_install,$(BENCH_PACKAGES))
	$(PY) -m bench

# Moves the pins on purpose: newest releases into .venv/, then constraints.txt
# rewritten from what is installed there (its comment header kept). Run make test
# before committing the new pins.
pins: setup
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	@{ sed -n '/^#/p' $(CONSTRAINTS); \
	  $(PY) -m pip list --format=freeze --path "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" \
	    | grep -viE '^(pvebackup|setuptools)=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@touch $(STAMP)
	@git diff --stat -- $(CONSTRAINTS) 2>/dev/null || true

clean:
	rm -rf $(VENV) build debian/pvebackup debian/files src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
