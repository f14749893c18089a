"""Work of other tools on a domain, which livesnap must not act on or break.

Before a changing command, livesnap refuses a domain on which a job runs that it did not
start: a block job on any disk (a user's ``virsh blockcopy``, ``blockcommit``,
``blockpull``) or a backup job (``virsh backup-begin``). An interrupted livesnap operation
is continued by ``livesnap recover`` alone, which does not come through here: every job
a changing command finds is someone else's.

Before a merge, it refuses a domain with libvirt checkpoints, or persistent dirty bitmaps
in the images the merge reads or writes (what incremental backups rely on: oVirt,
virtnbdbackup). A merge does not carry the bitmaps over yet (QEMU's
``block-dirty-bitmap-merge``); refusing with the reason is the first step.
"""
import logging

from livesnap.errors import BadImage, BitmapsPresent, ForeignJob

log = logging.getLogger(__name__)

MERGES = ("commit", "pull")


def refuse_jobs(domain):
    """Raise ``ForeignJob`` for the first job running on ``domain`` (a libvirt domain)."""
    if domain.kind != "libvirt":
        return
    for disk, job, dest in domain.block_jobs():
        raise ForeignJob(domain.name, disk, job, dest)
    if domain.backup_running():
        raise ForeignJob(domain.name, None, "backup", None)


def merged_images(plan):
    """Paths of the images the plan's merges read or write, in order, once each."""
    out = []
    for step in plan.steps:
        if step["op"] in MERGES:
            for p in (step["path"], step["child_path"]):
                if p not in out:
                    out.append(p)
    return out


def refuse_bitmaps(domain, plan):
    """Raise ``BitmapsPresent`` when the plan merges images of a domain with checkpoints,
    or images holding persistent dirty bitmaps."""
    images = merged_images(plan)
    if not images or domain.kind != "libvirt":
        return
    found = []
    names = domain.checkpoints()
    if names:
        found.append("libvirt checkpoints %s" % ", ".join(names))
    for path in images:
        names = bitmaps(path)
        if names:
            found.append("dirty bitmaps %s in %s" % (", ".join(names), path))
    if found:
        raise BitmapsPresent(domain.name, found)


def bitmaps(path):
    """Names of the persistent dirty bitmaps a qcow2 image holds ([] for other formats)."""
    from livesnap.tools import qemu_img
    try:
        return sorted(b.get("name", "?") for b in qemu_img.bitmaps(path))
    except BadImage:
        return []             # the images were validated: one gone meanwhile has no bitmaps
