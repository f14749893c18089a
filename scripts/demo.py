#!/usr/bin/env python3
"""livesnap demo on a shut-off libvirt domain with two qcow2 disks.

Defines a domain in a temporary directory, writes data into its disks, walks the snapshot
life cycle with the livesnap CLI (create, branch by revert, delete all three ways, cascade
reclaim), shows the tree after each step, verifies every snapshot's content and cleans up.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

URI = "qemu:///system"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*argv):
    return subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.PIPE,
                          text=True).stdout


def livesnap(*args, show=True):
    argv = [sys.executable, "-m", "livesnap.cli.main"] + list(args)
    if show:
        print("\n$ livesnap " + " ".join(args))
    out = subprocess.run(argv + ["--output", "json"], check=True, stdout=subprocess.PIPE,
                         text=True, cwd=HERE).stdout
    return json.loads(out)


def show_tree(dom):
    out = subprocess.run([sys.executable, "-m", "livesnap.cli.main", "snapshot-list", dom,
                          "--tree", "--all"], check=True, stdout=subprocess.PIPE, text=True,
                         cwd=HERE).stdout
    print("  " + out.rstrip().replace("\n", "\n  "))


def digest(path):
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw")
        sh("qemu-img", "convert", "-U", "-O", "raw", path, raw)
        with open(raw, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]


def main():
    import libvirt
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open(URI)
    tmp = tempfile.mkdtemp(prefix="livesnap-demo-")
    os.environ["LIVESNAP_STATE_DIR"] = os.path.join(tmp, "state")
    os.environ["LIBVIRT_DEFAULT_URI"] = URI
    name = "livesnap-demo-" + uuid.uuid4().hex[:6]
    disks = {}
    for t in ("vda", "vdb"):
        disks[t] = os.path.join(tmp, t + ".qcow2")
        sh("qemu-img", "create", "-q", "-f", "qcow2", disks[t], "32M")
    devs = "".join("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   "<source file='%s'/><target dev='%s' bus='virtio'/></disk>" % (p, t)
                   for t, p in disks.items())
    dom = conn.defineXML("<domain type='qemu'><name>%s</name><memory unit='MiB'>128</memory>"
                         "<os><type arch='x86_64'>hvm</type></os><devices>%s</devices></domain>"
                         % (name, devs))
    expected = {}

    def source(t):
        xml = dom.XMLDesc(0)
        start = xml.index("dev='%s'" % t)
        seg = xml[:start]
        return seg[seg.rindex("<source file='") + 14:].split("'")[0]

    def write(t, pattern, offset):
        sh("qemu-io", "-f", "qcow2", "-c", "write -P %d %d 1M" % (pattern, offset << 20), source(t))
        print("  (wrote pattern %d at %d MiB of %s)" % (pattern, offset, t))

    def remember(snap):
        expected[snap] = {t: digest(source(t)) for t in disks}

    def verify():
        listing = livesnap("snapshot-list", name, show=False)
        for s in listing["snapshots"]:
            got = {d["target"]: digest(d["image"]) for d in s["disks"]}
            assert got == expected[s["name"]], (s["name"], got, expected[s["name"]])
        print("  verified: %d snapshot(s) read exactly what they read when taken"
              % len(listing["snapshots"]))

    try:
        print("domain %s (shut off), disks vda and vdb in %s" % (name, tmp))
        write("vda", 1, 0)
        write("vdb", 2, 0)
        remember("base")
        livesnap("snapshot-create", name, "base", "--description", "fresh install")
        show_tree(name)
        write("vda", 3, 1)
        remember("upgraded")
        livesnap("snapshot-create", name, "upgraded")
        write("vdb", 4, 2)
        show_tree(name)
        remember("experiment")
        livesnap("snapshot-revert", name, "base", "--keep-current", "experiment")
        print("  reverted to base; the state left is kept as snapshot 'experiment'")
        assert {t: digest(source(t)) for t in disks} == expected["base"]
        show_tree(name)
        verify()
        r = livesnap("snapshot-delete", name, "base")
        print("  -> %s (base has two children: kept hidden for them)" % r["action"])
        show_tree(name)
        verify()
        r = livesnap("snapshot-delete", name, "experiment")
        print("  -> %s (experiment had no child)" % r["action"])
        show_tree(name)
        verify()
        r = livesnap("snapshot-delete", name, "upgraded")
        print("  -> %s, reclaimed %s" % (r["action"], r["reclaimed"]))
        show_tree(name)
        verify()
        write("vdb", 5, 3)
        remember("last")
        livesnap("snapshot-create", name, "last")
        write("vdb", 6, 4)
        r = livesnap("snapshot-delete", name, "last")
        print("  -> %s (last had one child, the live image: merged with it)" % r["action"])
        chk = livesnap("check", name)
        print("  check: %s" % ("ok" if chk["ok"] else chk["problems"]))
        left = sorted(f for f in os.listdir(tmp) if f.endswith(".qcow2"))
        print("  images left: %s" % ", ".join(left))
        print("\ndemo finished: every snapshot verified")
    finally:
        dom.undefine()
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
