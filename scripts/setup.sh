#!/usr/bin/env bash
# Install everything livesnap's tests, demo and benchmarks need on Debian 12 / Ubuntu,
# then make the virtualenv .venv (system Python, so Debian's python3-libvirt and python3-lxml
# are importable) with the PyPI test tools. Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  python3 python3-venv python3-pip python3-libvirt python3-lxml python3-libvhdi
  busybox-static cpio lvm2 mount util-linux systemd
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

bash scripts/build-blktap.sh >/dev/null  # real tapdisk/tap-ctl/vhd-util for tests/xen

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
# livesnap itself, editable, from pyproject.toml (PEP 660): .venv/bin/livesnap is pip's lean
# console-script wrapper (setup.py's legacy develop wrapper cost ~25 ms of CPU per command);
# editable_mode=compat: a .pth naming the checkout, no import hook run at every start
stamp=.venv/.requirements.stamp
if [ ! -f "$stamp" ] || ! cat requirements-dev.txt pyproject.toml | cmp -s - "$stamp"; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    --config-settings editable_mode=compat -e .
  cat requirements-dev.txt pyproject.toml > "$stamp"
fi
