#!/usr/bin/env bash
# Build the project's tiny writer test guest from Debian packages only (see
# ../testguest/ and /work/shared/GUEST-NOTES.md):
#   build/guest/vmlinuz      kernel of linux-image-cloud-amd64 (apt-get download + dpkg-deb -x,
#                            never installed on the host)
#   build/guest/initrd.img   newc cpio (gzip): busybox-static + virtio modules + testguest/init.sh as /init
# Cached: when build/guest/stamp matches the hash of this script and of init.sh, exits at once
# without touching apt. --force rebuilds (and re-resolves the kernel package).
# Env: LIVESNAP_GUEST_DIR overrides the output directory.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${LIVESNAP_GUEST_DIR:-$repo/build/guest}
init_src=$repo/testguest/init.sh
force=0
[[ ${1:-} == --force ]] && force=1

mkdir -p "$out"
want=$(cat "${BASH_SOURCE[0]}" "$init_src" | sha256sum | cut -d' ' -f1)
fresh() { [[ -f $out/stamp && -f $out/vmlinuz && -f $out/initrd.img && $(cat "$out/stamp") == "$want" ]]; }
if [[ $force == 0 ]] && fresh; then exit 0; fi

# One builder at a time (tests may start in parallel).
exec 9>"$out/.lock"
flock 9
if [[ $force == 0 ]] && fresh; then exit 0; fi

debs=$out/debs
mkdir -p "$debs"
# apt-get download as root wants _apt to be able to write here (else it warns, then works).
getent passwd _apt >/dev/null && chown _apt "$debs" 2>/dev/null || true
download() {  # download <pkg>...: into $debs, running apt-get update once if needed
  (cd "$debs" && apt-get download "$@" >/dev/null 2>"$out/apt.err") && return 0
  echo "build-guest: apt-get download $* failed, running apt-get update" >&2
  apt-get update >/dev/null
  (cd "$debs" && apt-get download "$@")
}
resolve_kernel() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1
}
kpkg=$(resolve_kernel)
if [[ -z $kpkg ]]; then apt-get update >/dev/null; kpkg=$(resolve_kernel); fi
[[ -n $kpkg ]] || { echo "build-guest: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
kdeb=$(ls "$debs/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
[[ -n $kdeb ]] || { download "$kpkg"; kdeb=$(ls "$debs/${kpkg}"_*.deb | head -n1); }
bdeb=$(ls "$debs"/busybox-static_*.deb 2>/dev/null | head -n1 || true)
[[ -n $bdeb ]] || { download busybox-static; bdeb=$(ls "$debs"/busybox-static_*.deb | head -n1); }

work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kdeb" "$work/k"
dpkg-deb -x "$bdeb" "$work/b"
kver=$(basename "$(ls -d "$work"/k/lib/modules/* | head -n1)")
mods=$work/k/lib/modules/$kver

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mods}
cp "$work/b/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
# Load order from GUEST-NOTES.md; a module built into this kernel is skipped.
order="virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci virtio_blk virtio_console"
: > "$root/mods/order"
for m in $order; do
  f=$(find "$mods/kernel" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
  if [[ -z $f ]]; then
    grep -q "/$m.ko\$" "$mods/modules.builtin" || { echo "build-guest: module $m missing" >&2; exit 1; }
    continue
  fi
  case $f in
    *.xz) xz -dc "$f" > "$root/mods/$m.ko" ;;
    *.zst) zstd -qdc "$f" > "$root/mods/$m.ko" ;;
    *) cp "$f" "$root/mods/$m.ko" ;;
  esac
  echo "$m" >> "$root/mods/order"
done
install -m 0755 "$init_src" "$root/init"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1) > "$work/initrd.img"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$out/vmlinuz"
mv -f "$work/initrd.img" "$out/initrd.img"
echo "$kver" > "$out/kernel-version"
echo "$want" > "$out/stamp"
echo "build-guest: $out/vmlinuz $out/initrd.img (kernel $kver)" >&2
