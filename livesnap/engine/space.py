"""The space preflight of a plan: what its new images and merges take, against what the file
systems and volume groups they go to have free."""
import os

from livesnap.errors import NoSpace

SPACE_MARGIN = 1 << 20


def preflight(plan):
    """Refuse (``NoSpace``) a plan whose new images and merges need more space than the file
    systems or volume groups they go to have; before anything is journaled."""
    need = {}
    for step in plan.steps:
        op = step["op"]
        if op == "commit":
            where, amount = step["path"], step["bytes"]
        elif op in ("pull", "fold"):
            where, amount = step["child_path"], step["bytes"]
        elif op in ("snapshot", "internal_snapshot"):
            for it in step.get("items") or [step]:
                key = os.path.dirname(it["leaf_path"])
                need[key] = need.get(key, 0) + _leaf_cost(it["leaf_path"])
            continue
        elif op == "new_leaf":
            # the parent may be made by an earlier step (a clone): sized from what exists
            sized = [p for p in (step["parent_path"], step["leaf_path"])
                     if os.path.exists(p)] or [step["parent_path"]]
            where, amount = step["leaf_path"], _leaf_cost(sized[0]) - SPACE_MARGIN
        elif op == "clone":
            where, amount = step["face_path"], 0
        else:
            continue
        key = os.path.dirname(where)
        need[key] = need.get(key, 0) + amount + SPACE_MARGIN
    by_dev = {}
    for directory, amount in need.items():
        dev, available = _available(directory)
        entry = by_dev.setdefault(dev, [directory, 0, available])
        entry[1] += amount
    for directory, amount, available in by_dev.values():
        if amount > available:
            raise NoSpace(directory, amount, available)


def _leaf_cost(path):
    """Space a new empty leaf beside ``path`` takes: a file's few KiB (SPACE_MARGIN), or an
    LV of the leaf's full size (LVHD leaves are fully inflated)."""
    from livesnap.tools import lvm
    if lvm.split_path(path) is None:
        return SPACE_MARGIN
    from livesnap.datapaths import vhd_storage
    return vhd_storage.for_path(path).leaf_cost(path)


def _available(directory):
    """(key, bytes free) where new data in ``directory`` goes: its file system, or the free
    space of the volume group when it is an LV directory (``/dev/<vg>``)."""
    from livesnap.tools import lvm
    if lvm.split_path(os.path.join(directory, "x")) is not None:
        from livesnap.datapaths import vhd_storage
        return vhd_storage.for_path(os.path.join(directory, "x")).available(directory)
    st = os.statvfs(directory)
    return os.stat(directory).st_dev, st.f_bavail * st.f_frsize
