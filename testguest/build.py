"""Build (or find cached) the writer guest's kernel and initramfs via scripts/build-guest.sh."""

import collections
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = os.path.join(REPO, "scripts", "build-guest.sh")
INIT_SCRIPT = os.path.join(REPO, "testguest", "init.sh")

GuestImage = collections.namedtuple("GuestImage", "kernel initrd kernel_version")


def guest_dir():
    return os.environ.get("LIVESNAP_GUEST_DIR") or os.path.join(REPO, "build", "guest")


def ensure_guest(force=False, timeout=900):
    """Return GuestImage(kernel, initrd, kernel_version), building it first when needed.

    The script exits at once when its stamp matches (no apt access); the first build downloads
    linux-image-cloud-amd64's kernel package and busybox-static with apt-get download (root).
    """
    cmd = ["bash", BUILD_SCRIPT] + (["--force"] if force else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("build-guest.sh failed (rc=%d): %s"
                           % (proc.returncode, proc.stderr.strip()[-2000:]))
    d = guest_dir()
    with open(os.path.join(d, "kernel-version")) as f:
        kver = f.read().strip()
    return GuestImage(os.path.join(d, "vmlinuz"), os.path.join(d, "initrd.img"), kver)
