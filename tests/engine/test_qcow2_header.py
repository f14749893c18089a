"""livesnap.qcow2 reads plain qcow2 headers without qemu-img: where it answers, it answers
what qemu-img answers; what qemu-img refuses, or what it does not vouch for, it leaves to
qemu-img (formats.chain / formats.info then run qemu-img)."""
import os
import random
import shutil
import struct
import subprocess

import pytest

from livesnap import formats, qcow2
from livesnap.errors import BadImage
from livesnap.tools import qemu_img

MiB = 1 << 20


def q(*args):
    subprocess.run(["qemu-img"] + [str(a) for a in args], check=True,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def slow_chain(path):
    """formats.chain as qemu-img gives it."""
    entries = qemu_img.info(path, backing_chain=True, force_share=True)
    out = []
    for i, e in enumerate(entries):
        backing = os.path.abspath(entries[i + 1]["filename"]) if i + 1 < len(entries) else None
        out.append(formats.ImageInfo(os.path.abspath(e["filename"]), e["format"], backing,
                                     e.get("actual-size", 0), e["virtual-size"]))
    return out


@pytest.fixture
def chains(tmp_path):
    d = tmp_path
    (d / "sub").mkdir()
    q("create", "-f", "qcow2", d / "base.qcow2", "64M")
    subprocess.run(["qemu-io", "-c", "write -P 7 1M 3M", str(d / "base.qcow2")], check=True,
                   stdout=subprocess.PIPE)
    q("create", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", d / "sub" / "mid.qcow2")
    q("create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", d / "sub" / "mid.qcow2",
      "-F", "qcow2", d / "top.qcow2")
    subprocess.run(["qemu-io", "-c", "write -P 9 0 2M", str(d / "top.qcow2")], check=True,
                   stdout=subprocess.PIPE)
    q("create", "-f", "raw", d / "disk.raw", "32M")
    q("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=2M", "-b", "disk.raw", "-F",
      "raw", d / "v2.qcow2")
    q("create", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", "v2.qcow2", "-F", "qcow2",
      d / "lazy.qcow2")
    q("create", "-f", "qcow2", "-o", "cluster_size=512", d / "small.qcow2", "1G")
    return d


def test_plain_chains_read_as_qemu_img_reads_them(chains):
    for leaf in ("top.qcow2", "sub/mid.qcow2", "lazy.qcow2", "small.qcow2", "base.qcow2"):
        path = str(chains / leaf)
        fast = formats._plain_qcow2_chain(path)
        assert fast is not None, leaf
        assert fast == slow_chain(path), leaf
        assert formats.chain(path, "qcow2") == fast
        for e in fast:
            if e.fmt == "qcow2":
                entry = qemu_img.info(e.path, force_share=True)
                assert formats.info(e.path, "qcow2") == formats.ImageInfo(
                    e.path, "qcow2", qemu_img.backing_path(entry, e.path),
                    entry.get("actual-size", 0), entry["virtual-size"])
    assert [e.fmt for e in formats.chain(str(chains / "lazy.qcow2"), "qcow2")] == \
        ["qcow2", "qcow2", "raw"]


def _set(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_what_it_does_not_vouch_for_is_left_to_qemu_img(chains, tmp_path):
    d = chains
    cases = {}
    # no backing format recorded: qemu-img would probe it
    p = d / "nofmt.qcow2"
    q("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p)
    with open(str(p), "rb") as f:
        header_length = struct.unpack(">I", f.read(104)[100:104])[0]
    _set(str(p), header_length, struct.pack(">I", 0))     # extensions end at once
    cases["nofmt"] = p
    # an internal snapshot
    p = d / "internal.qcow2"
    shutil.copy(str(d / "base.qcow2"), str(p))
    q("snapshot", "-c", "snap1", p)
    cases["internal"] = p
    # a json: backing name
    q("create", "-f", "qcow2", "-b",
      'json:{"driver":"qcow2","file":{"driver":"file","filename":"%s"}}' % (d / "base.qcow2"),
      "-F", "qcow2", d / "json.qcow2")
    cases["json"] = d / "json.qcow2"
    # an external data file
    q("create", "-f", "qcow2", "-o", "data_file=%s" % (d / "data.raw"), d / "ext.qcow2", "8M")
    cases["data_file"] = d / "ext.qcow2"
    # the corrupt bit, an unknown incompatible bit, encryption, version 4
    for name, offset, data in (("corrupt", 72, struct.pack(">Q", 2)),
                               ("unknown", 72, struct.pack(">Q", 1 << 40)),
                               ("crypt", 32, struct.pack(">I", 1)),
                               ("version", 4, struct.pack(">I", 4))):
        p = d / (name + ".qcow2")
        shutil.copy(str(d / "top.qcow2"), str(p))
        _set(str(p), offset, data)
        cases[name] = p
    # truncated: the header only, and the tables cut off
    for name, size in (("trunc100", 100), ("trunc_tables", 70000)):
        p = d / (name + ".qcow2")
        shutil.copy(str(d / "base.qcow2"), str(p))
        os.truncate(str(p), size)
        cases[name] = p
    # a raw file where the catalog says qcow2
    cases["raw"] = d / "disk.raw"
    for name, p in cases.items():
        assert qcow2.read_header(str(p)) is None, name
        assert formats._plain_qcow2_chain(str(p)) is None, name
    # a chain is only vouched for as a whole
    q("create", "-f", "qcow2", "-b", "corrupt.qcow2", "-F", "qcow2", d / "above.qcow2")
    assert qcow2.read_header(str(d / "above.qcow2")) is not None
    assert formats._plain_qcow2_chain(str(d / "above.qcow2")) is None
    # a loop
    q("create", "-f", "qcow2", d / "loop-a.qcow2", "1M")
    q("create", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", d / "loop-b.qcow2")
    q("rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", d / "loop-a.qcow2")
    assert formats._plain_qcow2_chain(str(d / "loop-a.qcow2")) is None
    with pytest.raises(BadImage):
        formats.chain(str(d / "loop-a.qcow2"), "qcow2")       # qemu-img's error
    with pytest.raises(BadImage):
        formats.info(str(d / "trunc100.qcow2"), "qcow2")


def test_damaged_headers_never_get_another_answer_than_qemu_img(chains):
    """Random damage to the first cluster: the reader either declines, or answers exactly
    what qemu-img answers; it never vouches for an image qemu-img refuses."""
    rng = random.Random(4242)
    sources = []
    for name in ("top.qcow2", "v2.qcow2", "sub/mid.qcow2"):   # v3, v2, relative backing
        with open(str(chains / name), "rb") as f:
            sources.append((str(chains / name), f.read(4096)))
    p = str(chains / "sub" / "fuzz.qcow2")
    answered = declined = 0
    for i in range(210):
        src, original = sources[i % len(sources)]
        shutil.copy(src, p)
        data = bytearray(original)
        for _ in range(rng.choice((1, 1, 2, 4))):
            pos = rng.choice((rng.randrange(0, 112), rng.randrange(0, 4096)))
            data[pos] = rng.randrange(256) if rng.random() < 0.7 else data[pos] ^ (
                1 << rng.randrange(8))
        _set(p, 0, bytes(data))
        fast = formats._plain_qcow2_chain(p)
        try:
            slow = slow_chain(p)
        except BadImage:
            slow = None
        if fast is None:
            declined += 1
            continue
        answered += 1
        assert slow is not None, (i, fast)
        assert fast == slow, i
    assert answered and declined
