"""libvirt domain XML: the disks livesnap works on, read with the standard library's
ElementTree and edited with lxml.

Only the elements we touch are modelled. A document that goes back to libvirt (a domain
definition, a snapshot's embedded domain) is parsed for editing with lxml
(``parse_for_edit``), so that everything else in it (namespaces and their prefixes,
comments) is kept as it is; reading alone needs no lxml (``parse``: the element API used
here is common to both).
"""
import collections
import os
import stat
import xml.etree.ElementTree as ET

Disk = collections.namedtuple("Disk", "target path fmt device source_type readonly")


def _etree():
    from lxml import etree  # imported only where XML is handled
    return etree


def parse(xml_text):
    """A document to read (ElementTree; expat resolves no external entities)."""
    return ET.fromstring(xml_text.encode() if isinstance(xml_text, str) else xml_text)


def parse_for_edit(xml_text):
    """A document to change and give back to libvirt (lxml, see the module's doc)."""
    etree = _etree()
    parser = etree.XMLParser(remove_blank_text=False, resolve_entities=False, no_network=True)
    return etree.fromstring(xml_text.encode() if isinstance(xml_text, str) else xml_text, parser)


def to_string(root):
    return _etree().tostring(root, encoding="unicode")


def domain_identity(root):
    """(name, uuid) of a <domain> element."""
    return root.findtext("name"), root.findtext("uuid")


def disks(root):
    """Every <disk> of the domain with a file or block source, as ``Disk`` tuples."""
    out = []
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        source = d.find("source")
        driver = d.find("driver")
        if target is None:
            continue
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev")
        fmt = driver.get("type") if driver is not None and driver.get("type") else "raw"
        out.append(Disk(target.get("dev"), path, fmt, d.get("device", "disk"),
                        d.get("type", "file"), d.find("readonly") is not None))
    return out


def snapshottable(disk):
    """A writable qcow2 disk on a file, or on a logical volume (``/dev/<vg>/<lv>``, as
    Proxmox VE and oVirt keep qcow2 on LVM): what the libvirt datapaths can snapshot."""
    if disk.device != "disk" or disk.path is None or disk.readonly or disk.fmt != "qcow2":
        return False
    if disk.source_type == "block":
        return is_lv_path(disk.path)
    return disk.source_type == "file"


def is_lv_path(path):
    """``path`` names a logical volume as LVM links it: ``/dev/<vg>/<lv>``."""
    from livesnap.tools import lvm
    return lvm.split_path(path) is not None


def is_block(path):
    """An image path that goes in a ``type='block'`` disk: a block device, or (not there
    yet) an LV path."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return is_lv_path(path)


def source_kind(path):
    """(disk type, <source> attribute) for an image path: ('block', 'dev') or
    ('file', 'file')."""
    return ("block", "dev") if is_block(path) else ("file", "file")


def unsupported(root):
    """[(target, reason)] of the domain's disks with data that ``snapshottable`` refuses:
    raw or other formats, block devices (but qcow2 on an LV, ``/dev/<vg>/<lv>``),
    network and pool volumes, read-only (CD-ROMs with media) and shareable disks. Drives
    without media hold nothing to snapshot and are not named."""
    out = []
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None:
            continue
        kind, device = d.get("type", "file"), d.get("device", "disk")
        source = d.find("source")
        if kind in ("file", "block") and (source is None or not (source.get("file") or
                                                                  source.get("dev"))):
            continue                  # an empty drive
        driver = d.find("driver")
        fmt = driver.get("type") if driver is not None and driver.get("type") else "raw"
        if kind == "network":
            why = "network disk (%s)" % (source.get("protocol") if source is not None
                                         else "no source")
        elif kind == "block":
            path = source.get("dev") or source.get("file")
            if fmt == "qcow2" and is_lv_path(path) and device == "disk" and \
                    d.find("readonly") is None and d.find("shareable") is None:
                continue
            why = ("%s on a block device that is not a logical volume /dev/<vg>/<lv> (qcow2 "
                   "is snapshotted on LVs only)" % fmt if fmt == "qcow2"
                   else "%s block device (livesnap snapshots qcow2 images only)" % fmt)
            if fmt == "qcow2" and is_lv_path(path):
                why = ("read-only disk" if d.find("readonly") is not None else
                       "shareable disk (other domains write it too)"
                       if d.find("shareable") is not None else "%s device (read-only media)"
                       % device)
        elif kind != "file":
            why = "%s disk (a storage pool volume or other source)" % kind
        elif device != "disk":
            why = "%s device (read-only media)" % device
        elif d.find("readonly") is not None:
            why = "read-only disk"
        elif d.find("shareable") is not None:
            why = "shareable disk (other domains write it too)"
        elif fmt != "qcow2":
            why = "%s image (livesnap snapshots qcow2 images only)" % fmt
        else:
            continue
        out.append((target.get("dev"), why))
    return out


def set_disk_sources(root, sources):
    """Point disks at new images: ``sources`` is {target: (path, fmt)}; ``root`` comes from
    ``parse_for_edit``.

    Any <backingStore> of those disks is dropped: libvirt then reads the chain from the
    images themselves (their backing file and format are recorded in them).
    """
    etree = _etree()
    found = set()
    for d in root.findall("./devices/disk"):
        target = d.find("target")
        if target is None or target.get("dev") not in sources:
            continue
        path, fmt = sources[target.get("dev")]
        source = d.find("source")
        if source is None:
            source = etree.SubElement(d, "source")
        kind, attr_name = source_kind(path)
        d.set("type", kind)
        source.set(attr_name, path)
        for attr in ("index", "file" if attr_name == "dev" else "dev"):
            if attr in source.attrib:
                del source.attrib[attr]
        driver = d.find("driver")
        if driver is not None:
            driver.set("type", fmt)
        for bs in d.findall("backingStore"):
            d.remove(bs)
        found.add(target.get("dev"))
    missing = set(sources) - found
    if missing:
        raise KeyError("no disk %s in the domain" % ", ".join(sorted(missing)))
    return root


def backing_chain(root, target):
    """The live backing chain of a disk from the running domain's XML: [(path, fmt), ...],
    active image first."""
    for d in root.findall("./devices/disk"):
        t = d.find("target")
        if t is None or t.get("dev") != target:
            continue
        chain = []
        node = d
        while node is not None:
            source = node.find("source")
            if source is None:
                break
            fmt_el = node.find("driver") if node is d else node.find("format")
            chain.append((source.get("file") or source.get("dev"),
                          fmt_el.get("type") if fmt_el is not None else None))
            node = node.find("backingStore")
        return chain
    raise KeyError(target)
