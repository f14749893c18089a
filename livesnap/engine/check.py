"""``livesnap check``: the catalog against the images, the domain and libvirt's metadata."""
import os
import stat

from livesnap import formats
from livesnap.errors import BadImage, Error


def image_problems(domain, tree, opaque=()):
    """Every way the domain's disks and the images on disk disagree with the catalog, as
    ``BadImage`` errors (not raised): a disk using another image, an image missing or not
    opening, of another format or with another backing file. Nodes in ``opaque`` (leaves a
    tapdisk holds open: their metadata is stale until a pause) are not read. Refreshes each
    node's allocation size on the way (an opaque leaf's from its file size)."""
    sources = {d.target: d.path for d in domain.disks()}
    for disk, nid in sorted(tree.active.items()):
        path = tree.nodes[nid].path
        if sources.get(disk) != path:
            yield BadImage(sources.get(disk) or disk,
                           "disk %s of '%s' uses %s but livesnap's catalog has %s; it was "
                           "changed outside livesnap (see 'livesnap check %s')"
                           % (disk, domain.name, sources.get(disk), path, domain.name))
    nodes = sorted(tree.nodes.values(), key=lambda n: n.path)
    missing = {n.id for n in nodes if not os.path.exists(n.path)}
    for n in nodes:
        if n.id in missing:
            yield BadImage(n.path, "image of node %s (%s) is missing" % (n.id, n.state))
    # one qemu-img call per disk reads its whole live chain; other images one by one
    infos = {}
    for nid in tree.active.values():
        leaf = tree.nodes[nid]
        if leaf.fmt == "qcow2" and nid not in opaque and not missing:
            try:
                for e in formats.chain(leaf.path, leaf.fmt):
                    infos.setdefault(e.path, e)
            except BadImage:
                pass                    # each image below says what is wrong with it
    for n in nodes:
        if n.id in missing:
            continue
        if n.id in opaque:
            # its allocation estimated from the file: the planner weighs commit and pull
            n.alloc = _opaque_alloc(n.path)
            continue
        try:
            entry = infos.get(n.path) or formats.info(n.path, n.fmt)
        except BadImage as e:
            yield e
            continue
        if entry.fmt != n.fmt:
            yield BadImage(n.path, "format is %s, catalog says %s" % (entry.fmt, n.fmt))
        want = tree.nodes[n.parent].path if n.parent else None
        if entry.backing != want:
            yield BadImage(n.path, "backing file is %s, expected %s" % (entry.backing, want))
        n.alloc = entry.alloc


def _opaque_alloc(path):
    """What a leaf a tapdisk holds open has allocated, without trusting its footer: a file's
    size; on a block device (an LV, whose size says nothing) the end of data its BAT gives
    (tapdisk writes a BAT entry when it allocates a block), read without validating it: it
    may point past the footer on disk while tapdisk allocates."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return st.st_size
    from livesnap import vhd
    try:
        return vhd.data_end_unchecked(path)
    except vhd.VhdError:
        return 0


def check(engine, s):
    """Compare the catalog of session ``s`` with the images on disk, the domain's disks and
    (libvirt) libvirt's snapshot metadata; a dict with the problems (empty when sound)."""
    problems = []
    op = s.catalog.unfinished()
    if op is not None:
        problems.append("operation #%d (%s) is unfinished: run 'livesnap recover %s'"
                        % (op.id, op.op, s.domain.name))
    tree = engine.load(s, validate=False, datapath=s.datapath)
    if s.follow_error:
        problems.append("changes made outside livesnap cannot be followed: %s"
                        % s.follow_error)
    problems += tree.validate()
    xen = s.domain.kind == "xen"
    opaque = set(tree.active.values()) if xen and s.domain.is_running() else set()
    problems += [str(e) for e in image_problems(s.domain, tree, opaque)]
    if xen:
        from livesnap import vhd
        problems += ["%s: %s" % (n.path, p) for n in sorted(tree.nodes.values(),
                                                            key=lambda n: n.path)
                     if n.id not in opaque and os.path.exists(n.path) for p in vhd.check(n.path)]
    record_problems = getattr(s.domain, "record_problems", None)   # XAPI: its VDI records
    if record_problems is not None:
        problems += record_problems(tree)
    if s.domain.kind == "libvirt":
        problems += _check_libvirt_metadata(s, tree)
        if s.domain.is_running():
            problems += _next_boot_problems(s.domain, tree)
    found = engine._users(s, tree)
    sharing, notes = _sharing(s, tree, found)
    record_notes = getattr(s.domain, "record_notes", None)    # XAPI: records the user dropped
    if record_notes is not None:
        notes += record_notes(tree)
    problems += sharing
    known = {n.path for n in tree.nodes.values()}
    for directory, prefix, suffix in sorted(_own_file_patterns(s.domain, tree)):
        for entry in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            path = os.path.join(directory, entry)
            if entry.startswith(prefix) and entry.endswith(suffix) and path not in known:
                problems.append("image %s looks like livesnap's but the catalog does not "
                                "know it%s" % (path, _lv_hint(path)))
    if problems and op is None:
        problems += _repair_hint(engine, s, tree)
    return {"domain": s.domain.name, "ok": not problems, "problems": problems,
            "notes": notes,
            "reclaimable": [tree.nodes[n].snapshot for n in tree.reclaimable()
                            if tree.nodes[n].path not in found]}


def _repair_hint(engine, s, tree):
    """What ``check --repair`` would do about the problems found (it re-reads the catalog
    from libvirt's metadata and the images), or why it cannot."""
    from livesnap.engine import follow
    if s.domain.kind != "libvirt":
        return []
    try:
        followed, changes = follow.reconcile(engine, s, tree)
    except Error as e:
        return ["'livesnap check --repair %s' cannot bring the catalog in step: %s"
                % (s.domain.name, e)]
    if follow.same(tree, followed):
        return []
    return ["the catalog is out of step with libvirt's metadata and the images: 'livesnap "
            "check --repair %s' brings it in step (adopts %s; records %s as gone)"
            % (s.domain.name, ", ".join(changes["adopted"]) or "nothing",
               ", ".join(changes["gone"]) or "nothing")]


def _sharing(s, tree, found):
    """(problems, notes) about images with another user: one image in two disks' chains
    of the domain, or an image the domain writes that something else reads, is a problem;
    a snapshot's or hidden image something else reads is a note (livesnap keeps it while it
    is read); a base (a template under the disk, never written by livesnap) is not named."""
    from livesnap.engine import users
    from livesnap.model.tree import ACTIVE, BASE
    problems = [str(e) for e in (users.ImageShared(s.domain.name, path, disks)
                                 for path, disks in users.shared_within(tree))]
    notes = []
    for n in sorted(tree.nodes.values(), key=lambda n: n.path):
        who = found.get(n.path)
        if not who or n.state == BASE:
            continue
        if n.state == ACTIVE:
            problems.append("image %s, which disk %s of '%s' writes, is also read by %s"
                            % (n.path, n.disk, s.domain.name, ", ".join(who)))
        else:
            what = ("snapshot %s" % n.snapshot) if n.snapshot else n.state
            notes.append("image %s (%s, disk %s) is also used by %s: livesnap never merges "
                         "into it or deletes it while it is" % (n.path, what, n.disk,
                                                               ", ".join(who)))
    return problems, notes


def _check_libvirt_metadata(session, tree):
    from livesnap.platforms import libvirt_snapshots
    try:
        theirs = {x.name: x.parent for x in libvirt_snapshots.list_snapshots(session.domain)}
    except Error as e:
        return [str(e)]
    ours = {x.name: tree.snapshot_parent(x.name) for x in tree.visible_snapshots()}
    extra = [n for n in theirs if n not in ours]
    known = session.catalog.known_names() if extra else set()
    foreign = sorted(n for n in extra if n not in known)
    theirs = {n: p for n, p in theirs.items() if n not in foreign}
    problems = []
    if theirs != ours:
        problems.append("libvirt's snapshot metadata %s differs from livesnap's snapshots %s: "
                        "'livesnap recover %s' brings it in step"
                        % (sorted(theirs.items()), sorted(ours.items()), session.domain.name))
    for name in foreign:
        problems.append("libvirt has a snapshot %r that livesnap did not make; livesnap leaves "
                        "it alone ('virsh snapshot-delete --metadata %s %s' removes its "
                        "definition)" % (name, session.domain.name, name))
    return problems


def _next_boot_problems(domain, tree):
    """A running domain whose next-boot (persistent) definition names, for a disk, an image
    of livesnap's tree other than the one the disk runs on (a snapshot's, hidden or base
    image, e.g. the definition a libvirtd reload put back over a snapshot's): booted so, the
    disk would lose every write since and write into images snapshots read."""
    paths = {n.path: n for n in tree.nodes.values()}
    problems = []
    for d in domain.disks(inactive=True):
        leaf = tree.active.get(d.target)
        n = paths.get(d.path)
        if leaf is None or n is None or n.id == leaf:
            continue
        what = ("snapshot %s" % n.snapshot) if n.snapshot else n.state
        problems.append("the next boot of '%s' would run disk %s on %s (%s image), not on %s, "
                        "which it runs on now: the writes since would be missing; define disk "
                        "%s on %s ('virsh edit %s') before the domain stops"
                        % (domain.name, d.target, d.path, what, tree.nodes[leaf].path,
                           d.target, tree.nodes[leaf].path, domain.name))
    return problems


def _lv_hint(path):
    """What to do about an LV in no chain of the catalog (e.g. one libvirt's snapshot-delete
    merged away: libvirt does not remove block devices)."""
    from livesnap.datapaths import lv_images
    if not lv_images.is_lv(path):
        return ""
    vg, lv = lv_images.split(path)
    return ("; an LV a merge outside livesnap (virsh snapshot-delete, blockcommit) left "
            "behind? libvirt removes no block device: 'lvremove %s/%s' once its data is not "
            "needed" % (vg, lv))


def _own_file_patterns(domain, tree):
    """(directory, prefix, suffix) of the file names livesnap gives new images."""
    out = set()
    for disk, nid in tree.active.items():
        leaf = tree.nodes[nid].path
        directory, base = os.path.split(leaf)
        if domain.kind == "xen":
            stem = base[:-4] if base.endswith(".vhd") else base
            out.add((directory, stem + ".", ".vhd"))
        else:
            from livesnap.datapaths import lv_images
            prefix = domain.name + "-"
            out.add((directory, lv_images.lv_name(prefix) if lv_images.is_lv(leaf) else prefix,
                     ".qcow2"))
    return out
