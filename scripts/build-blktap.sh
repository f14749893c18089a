#!/usr/bin/env bash
# Build the real blktap (tapdisk, tap-ctl, vhd-util, cbt-util) from ../shared/upstream for the
# Xen tests, plus the LD_PRELOAD shim that lets tapdisk start without CAP_SYS_RESOURCE (see
# testxen/preload/memlock_shim.c). The result lives in a cache directory keyed by the archive's
# sha256, so a second run does not rebuild. Prints the prefix (bin/vhd-util, sbin/tap-ctl,
# sbin/cbt-util, libexec/tapdisk, lib/memlock_shim.so, testbed/tap-ctl: tap-ctl with the shim
# preloaded).
# Idempotent; run as root (installs missing build dependencies with apt).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${LIVESNAP_SHARED:-$repo/../shared}"
cache_root="${LIVESNAP_CACHE:-/var/cache/livesnap}"

shopt -s nullglob
archives=("$shared"/upstream/blktap-*.tar.gz)
if [ ${#archives[@]} -ne 1 ]; then
  echo "build-blktap: expected one blktap-*.tar.gz in $shared/upstream, found ${#archives[@]}" >&2
  exit 1
fi
archive="${archives[0]}"
sha="$(sha256sum "$archive" | cut -d' ' -f1)"
prefix="$cache_root/blktap-$sha"
stamp="$prefix/.built"

shim_src="$repo/testxen/preload/memlock_shim.c"
shim="$prefix/lib/memlock_shim.so"

if [ ! -f "$stamp" ]; then
  deps=(autoconf automake libtool make gcc libaio-dev libxen-dev uuid-dev zlib1g-dev libssl-dev)
  missing=()
  for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "build-blktap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
  fi

  work="$(mktemp -d "${TMPDIR:-/tmp}/blktap-build.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  tar xzf "$archive" -C "$work"
  src=("$work"/blktap-*/)
  src="${src[0]}"
  (
    cd "$src"
    # version.m4 includes a VERSION file that the archive does not carry.
    [ -f VERSION ] || echo 4.0.8 > VERSION
    autoreconf -fi
    # upstream builds with -Werror and gcc 12 warns; --disable-shared links libvhd in.
    ./configure --prefix="$prefix" --disable-shared CFLAGS="-g -O2 -Wno-error"
    # only these subdirectories: the others need cmocka or install outside the prefix.
    for d in lvm vhd control drivers; do
      make -j2 -C "$d"
    done
    for d in lvm vhd control drivers; do
      make -C "$d" install
    done
  ) >&2
  rm -rf "$work"
  trap - EXIT
fi

# cbt-util (blktap's cbt/: two C files and libuuid, what SM's cbtutil.py runs as
# /usr/sbin/cbt-util) is compiled on its own, as its cbt/Makefile.am would (-Wall -Werror), so
# that a cache built before it was added gets it without a full rebuild.
cbt_util="$prefix/sbin/cbt-util"
if [ ! -x "$cbt_util" ]; then
  cbt_work="$(mktemp -d "${TMPDIR:-/tmp}/blktap-cbt.XXXXXX")"
  trap 'rm -rf "$cbt_work"' EXIT
  tar xzf "$archive" -C "$cbt_work" --wildcards '*/cbt/*' '*/include/*' '*/drivers/tapdisk-log.h'
  cbt_src=("$cbt_work"/blktap-*/)
  cbt_src="${cbt_src[0]}"
  mkdir -p "$prefix/sbin"
  gcc -g -O2 -Wall -Werror -I"$cbt_src/include" -o "$cbt_util.tmp" \
    "$cbt_src/cbt/main.c" "$cbt_src/cbt/cbt-util.c" -luuid
  mv "$cbt_util.tmp" "$cbt_util"
  rm -rf "$cbt_work"
  trap - EXIT
fi

# The shim is our code: rebuild it when its source is newer than the built library.
if [ ! -f "$shim" ] || [ "$shim_src" -nt "$shim" ]; then
  mkdir -p "$prefix/lib"
  gcc -shared -fPIC -O2 -Wall -o "$shim.tmp" "$shim_src" -ldl
  mv "$shim.tmp" "$shim"
fi

# tap-ctl with the shim preloaded (tap-ctl execs libexec/tapdisk, which inherits it): what the
# tests point livesnap's TAP_CTL at.
mkdir -p "$prefix/testbed"
printf '#!/bin/sh\nLD_PRELOAD=%s/lib/memlock_shim.so exec %s/sbin/tap-ctl "$@"\n' \
  "$prefix" "$prefix" > "$prefix/testbed/tap-ctl.tmp"
chmod 755 "$prefix/testbed/tap-ctl.tmp"
mv "$prefix/testbed/tap-ctl.tmp" "$prefix/testbed/tap-ctl"

for t in sbin/tap-ctl sbin/cbt-util bin/vhd-util libexec/tapdisk lib/memlock_shim.so testbed/tap-ctl; do
  if [ ! -e "$prefix/$t" ]; then
    echo "build-blktap: $prefix/$t missing after the build" >&2
    exit 1
  fi
done
touch "$stamp"
echo "$prefix"
