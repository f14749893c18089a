#!/usr/bin/env bash
# Start virtlogd and libvirtd by hand (no systemd here), as ../shared/GUEST-NOTES.md found works:
# the libvirt-qemu user must exist, QEMU runs as root without a security driver.
# Idempotent: does nothing when libvirtd already answers.
set -euo pipefail
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
