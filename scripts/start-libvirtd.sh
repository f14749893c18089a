#!/usr/bin/env bash
# Start virtlogd and libvirtd by hand (no systemd here), as ../shared/GUEST-NOTES.md found works:
# the libvirt-qemu user must exist, QEMU runs as root without a security driver.
# Idempotent: does nothing when libvirtd already answers.
set -euo pipefail
# A no-op qemu hook, in place before libvirtd starts: libvirt (virhook.c) looks for hooks only
# when it starts and when it reloads (SIGHUP), and calls none for a driver it found none for;
# once it has found one in qemu.d it rereads qemu.d on every hook call. So a hook a test
# installs later (tests/hooks/test_libvirtd.py) runs without a reload: a reload overlapping a
# snapshot of another test can put back a stale definition or crash libvirtd (libvirt 9.0).
keep=/etc/libvirt/hooks/qemu.d/00-livesnap-test-keep
if [ ! -x "$keep" ]; then
  mkdir -p "${keep%/*}"
  printf '#!/bin/sh\n# no-op: keeps libvirtd looking into qemu.d (scripts/start-libvirtd.sh)\nexec cat >/dev/null\n' >"$keep.tmp"
  chmod 755 "$keep.tmp" && mv "$keep.tmp" "$keep"
  # a libvirtd already running has not seen it: one reload now, before any test runs
  if pid=$(pgrep -o -x libvirtd); then kill -HUP "$pid"; sleep 1; fi
fi
if virsh -c qemu:///system version >/dev/null 2>&1; then exit 0; fi
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /etc/libvirt/hooks/qemu.d
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd --system -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
conf=/etc/libvirt/qemu.conf
touch "$conf"
for kv in 'user = "root"' 'group = "root"' 'security_driver = "none"'; do
  key=${kv%% *}
  if grep -qE "^\s*${key}\s*=" "$conf"; then
    sed -i -E "s|^\s*${key}\s*=.*|${kv}|" "$conf"
  else
    echo "$kv" >> "$conf"
  fi
done
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 50); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "libvirtd did not come up" >&2
exit 1
