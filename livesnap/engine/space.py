"""The space preflight of a plan: what its new images and merges take, against what the file
systems and volume groups they go to have free."""
import os

from livesnap.errors import NoSpace

SPACE_MARGIN = 1 << 20


def preflight(plan, live=False):
    """Refuse (``NoSpace``) a plan whose new images and merges need more space than the file
    systems or volume groups they go to have; before anything is journaled. ``live``: the
    domain runs (its chain's images are open in QEMU)."""
    from livesnap.datapaths import lv_images
    need = {}
    for step in plan.steps:
        op = step["op"]
        if op in ("commit", "pull", "fold"):
            target, source, in_chain = (
                (step["path"], step["child_path"], step.get("node_in_chain")) if op == "commit"
                else (step["child_path"], step["path"], step.get("child_in_chain")))
            fmt = step.get("fmt") if op == "commit" else step.get("child_fmt")
            if fmt == "qcow2" and lv_images.is_lv(target):
                amount = _lv_growth(target, source, live and in_chain)
                if amount:
                    key = os.path.dirname(target)
                    need[key] = need.get(key, 0) + amount
                continue
            where, amount = target, step["bytes"]
        elif op in ("snapshot", "internal_snapshot"):
            for it in step.get("items") or [step]:
                key = os.path.dirname(it["leaf_path"])
                if it.get("fmt") == "qcow2" and lv_images.is_lv(it["leaf_path"]):
                    cost = lv_images.leaf_cost(it["frozen_path"], it["leaf_path"])  # thick
                else:
                    cost = _leaf_cost(it["leaf_path"])
                need[key] = need.get(key, 0) + cost
            continue
        elif op == "new_leaf":
            # the parent may be made by an earlier step (a clone): sized from what exists
            sized = [p for p in (step["parent_path"], step["leaf_path"])
                     if os.path.exists(p)] or [step["parent_path"]]
            if step.get("fmt") == "qcow2" and lv_images.is_lv(step["leaf_path"]):
                key = os.path.dirname(step["leaf_path"])
                need[key] = need.get(key, 0) + lv_images.leaf_cost(step["parent_path"],
                                                                   step["leaf_path"])
                continue
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


def _lv_growth(target, source, held):
    """What a merge of ``source``'s data into the qcow2 on LV ``target`` takes from its VG
    (``lv_images.growth``); refused (``LvTooSmall``) when it must grow while QEMU holds it."""
    from livesnap.datapaths import lv_images
    if not os.path.exists(source):
        return 0                        # merged away before (a re-run): nothing to add
    more, size = lv_images.growth(target, lv_images.data_of(source))
    if more and held:
        raise lv_images.LvTooSmall(target, size + more, size)
    return more


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
