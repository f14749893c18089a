"""The catalog of a VM XAPI no longer has (``xe vm-uninstall``: the VM, its owned disks and
its snapshots destroyed, SM's GC removing the base copies left without a child), removed from
the state directory by the follower (platforms/xapi_follow.py, handed ``forget_if_done`` by
its front end, cli/xapi_follow.py) once nothing is left that
``recover`` could need: every image the catalog names, and every image an unfinished
operation of its journal would make, known to be gone. Until then it stays, and the follower
reports what is left.

"Known gone": a file SR's image is gone when its SR directory is there (mounted) and the
file is not; an LVHD image when LVM's metadata has its volume group but not its LV (active
or not). An unmounted SR, a volume group LVM does not see or an LVM command that fails say
nothing: the image counts as left.

Python 3.6, stdlib only.
"""
import logging
import os

from livesnap import statedir
from livesnap.engine import names
from livesnap.errors import Error
from livesnap.lock import DomainLock
from livesnap.tools import lvm

log = logging.getLogger(__name__)


def image_left(path):
    """Whether the image at ``path`` may still be there (True unless known gone)."""
    if os.path.exists(path):
        return True
    vg_lv = lvm.split_path(path)
    if vg_lv is not None:
        try:
            lvm.lv_size(*vg_lv)
            return True
        except lvm.LvNotFound as e:
            return "volume group" in str(e).lower()      # its VG not seen: cannot tell
        except Error as e:
            log.debug("lvs %s/%s: %s", vg_lv[0], vg_lv[1], e)
            return True
    return not os.path.isdir(os.path.dirname(path))


def catalog_images(cat):
    """Every image path a catalog names: its tree's, and those its unfinished operation
    would make."""
    paths = {n.path for n in cat.load_tree().nodes.values() if n.path}
    op = cat.unfinished()
    if op is not None:
        paths.update(p for p in names.new_paths(op.plan.get("steps", []), paths) if p)
    return sorted(paths)


def forget_if_done(state_dir, vm):
    """For a VM XAPI no longer has: [images left] (the catalog kept), or [] when every image
    is gone and the catalog, its journal and its lock were removed. ``Busy`` when a livesnap
    command holds the VM (nothing removed)."""
    from livesnap.catalog import Catalog
    files = statedir.domain_files(state_dir, vm)
    db, lock = files[0], files[-1]
    if not os.path.exists(db):
        return []
    with DomainLock(lock, vm):
        cat = Catalog(db)
        try:
            left = [p for p in catalog_images(cat) if image_left(p)]
        finally:
            cat.close()
        if left:
            return left
        # the lock last, still held: a command that opens it now finds the catalog gone
        for path in files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    log.info("VM %s is gone from XAPI and so are all its images: its catalog %s is removed",
             vm, db)
    return []
