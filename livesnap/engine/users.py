"""Users of an image: who else reads the images of a domain's tree.

livesnap's catalog knows the children it made. Other users it finds before it plans a
merge or a removal: the disks and backing chains of every other domain on the connection
(running or not), the domain's own disks that livesnap does not manage, and every image in
the storage directories (those of the tree's images and ``--storage-dir``; for an LVHD
volume group its active LVs) whose backing chain, read from its header alone, reaches one
of the tree's images.

An image one of them reads is never written or deleted: the planner keeps its node (hidden)
instead. One image twice in one domain's chains (the same file, a hard link, a symlink) is
refused before anything changes (``refuse_shared``).
"""
import logging
import os
import stat

from livesnap import formats, qcow2
from livesnap.errors import Error, ImageShared
from livesnap.model.tree import BASE

log = logging.getLogger(__name__)

MAX_WALK = 256
VHD_COOKIE = b"conectix"


def image_key(path):
    """What makes two paths one image: the inode they open (hard links, symlinks), for a
    block device the device it opens (an LV is /dev/<vg>/<lv>, /dev/mapper/<vg>-<lv> and
    /dev/dm-<n>: three nodes of one device), or the real path when it is not there."""
    try:
        return _stat_key(os.stat(path))
    except OSError:
        return ("path", os.path.realpath(path))


def _stat_key(st):
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return (st.st_dev, st.st_ino)


# -- one domain's own chains -------------------------------------------------------------

def shared_within(tree):
    """[(path, [disk, ...])] of images that nodes of two or more disks of the tree name,
    unless every such node is a base (read-only to livesnap: a common template)."""
    by_key = {}
    for n in sorted(tree.nodes.values(), key=lambda n: (n.disk, n.path)):
        by_key.setdefault(image_key(n.path), []).append(n)
    out = []
    for nodes in by_key.values():
        disks = sorted({n.disk for n in nodes})
        if len(disks) > 1 and any(n.state != BASE for n in nodes):
            out.append((nodes[0].path, ["%s (%s)" % (n.disk, n.path) for n in nodes]))
    return sorted(out)


def refuse_shared(domain, tree):
    for path, disks in shared_within(tree):
        raise ImageShared(domain.name, path, disks)


# -- everyone else -----------------------------------------------------------------------

def find(domain, tree, storage_dirs=()):
    """{node path: [user, ...]} for the tree's images that something outside the tree
    reads; a user is a name for people ("domain 'b' disk vda (/x/b.qcow2)", "image /x/y")."""
    ours = {}
    for n in tree.nodes.values():
        ours.setdefault(image_key(n.path), n.id)
    users = {}

    def record(label, paths):
        for p in paths:
            nid = ours.get(image_key(p))
            if nid is None:
                continue
            for anc in tree.chain(nid):       # it reads the node and all below it
                labels = users.setdefault(tree.nodes[anc].path, [])
                if label not in labels:
                    labels.append(label)

    seen = set(ours)
    for label, paths in _domain_chains(domain, tree):
        seen.update(image_key(p) for p in paths)
        record(label, paths)
    for label, paths in _directory_chains(tree, storage_dirs, seen, ours):
        record(label, paths)
    return users


def _domain_chains(domain, tree):
    """(label, [path, ...]) of each disk of another domain, and of this domain's disks the
    tree does not hold, each with its backing chain (from the XML and from the headers)."""
    own = []
    for inactive in (False, True):
        try:
            own.extend(domain.disks(inactive=inactive))
        except TypeError:
            own.extend(domain.disks())
            break
        except Error:
            continue
    for d in own:
        if d.path and d.target not in tree.active:
            yield ("domain '%s' disk %s (%s)" % (domain.name, d.target, d.path),
                   _disk_chain(d.path, d.fmt, []))
    others = getattr(domain, "other_domains_xml", None)
    docs = others() if others is not None else []
    from livesnap.platforms import domain_xml
    for name, xmls in docs:
        done = set()
        for text in xmls:
            try:
                root = domain_xml.parse(text)
            except Exception:  # ElementTree's ParseError: libvirt's own XML, not expected
                continue
            for d in domain_xml.disks(root):
                if not d.path or (d.target, d.path) in done:
                    continue
                done.add((d.target, d.path))
                try:
                    listed = [p for p, _ in domain_xml.backing_chain(root, d.target) if p]
                except KeyError:
                    listed = []
                yield ("domain '%s' disk %s (%s)" % (name, d.target, d.path),
                       _disk_chain(d.path, d.fmt, listed))


def _disk_chain(path, fmt, listed):
    """The disk's image, the chain its XML lists, and the chain its headers give."""
    out = [path] + [p for p in listed if p != path]
    if fmt in ("qcow2", "vhd") and os.path.exists(path):
        try:
            out += [e.path for e in formats.chain(path, fmt)]
        except Error as e:
            log.debug("chain of %s not read: %s", path, e)
            out += _walk(_backing_of(path))
    return out


def _directory_chains(tree, storage_dirs, seen, ours):
    """(label, [path, ...]) of each image in the storage directories that is not one of the
    tree's and backs onto something: its header's chain, up to the first of ours."""
    dirs = {os.path.dirname(n.path) for n in tree.nodes.values()}
    dirs.update(storage_dirs or ())
    for directory in sorted(dirs):
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.startswith("."):
                continue                # livesnap's trash and other hidden files
            path = os.path.join(directory, entry)
            try:
                st = os.stat(path)
            except OSError:
                continue
            # files, and the LVs of a volume group (/dev/<vg>: only active ones are there)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)) or \
                    _stat_key(st) in seen:
                continue
            parent = _backing_of(path)
            if parent is None:
                continue
            yield "image %s" % path, [path] + _walk(parent, ours)


def _walk(path, stop=()):
    """``path`` and its ancestors from their headers, to the first image in ``stop``."""
    out = []
    while path is not None and len(out) < MAX_WALK and path not in out:
        out.append(path)
        if image_key(path) in stop:
            break
        path = _backing_of(path)
    return out


def _backing_of(path):
    """The backing file a qcow2 or VHD image's header names (absolute), or None."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except (IOError, OSError):
        return None
    if magic[:4] == qcow2.MAGIC:
        h = qcow2.read_header(path)
        if h is not None:
            from livesnap.tools import qemu_img
            return qemu_img.resolve_backing(h.backing, path)
        try:
            return formats.info(path, "qcow2").backing
        except Error:
            return None
    if magic == VHD_COOKIE:
        from livesnap import vhd
        try:
            with vhd.open_image(path, chain=False) as img:
                if not img.is_differencing:
                    return None
                candidates = img.parent_candidates()
                for p in candidates:
                    if os.path.exists(p):
                        return p
                return candidates[0] if candidates else None
        except Exception as e:  # a VHD we cannot read names no parent we can see
            log.debug("VHD %s not read: %s", path, e)
            return None
    return None
