"""A fold (a hidden image merged into the running leaf below it: ``TapdiskDatapath.do_fold``)
cut short by a crash, brought to a state the next datapath's fold goes on from. When the host
went down with it the domain is shut off and the offline datapath resumes it: a plain pull of
the node into the leaf would find the leaf gone (renamed to the round's spare image inside
the pause) or point the leaf past a spare image not yet merged into the node (its data, and
the node's, lost). Each part checks what is already done."""
import os

from livesnap import vhd
from livesnap.datapaths.vhd_storage import for_path as storage


def parent_or_none(path):
    """The parent ``path``'s header names (absolute), None for a half-made image. Read
    without the BAT (``vhd.parent_of``): the leaf a tapdisk holds open may be ``path``."""
    try:
        parent = vhd.parent_of(path)
    except vhd.VhdError:
        return None
    return os.path.abspath(parent) if parent else None


def settle(datapath, step):
    """Finish a round of ``step``'s fold left half done (its freeze of the leaf into the
    spare image, the commit of the spare into the node, the removal of a merged spare), or
    its last rename of the node over the leaf; then the fold is a node with the leaf as its
    only child (or done)."""
    leaf, node, spare, disk = (step["child_path"], step["path"], step.get("spare_path"),
                               step["disk"])
    st = storage(leaf)
    if not spare or not st.exists(node):
        return
    if st.exists(spare):
        if parent_or_none(leaf) == node:
            st.remove(spare)                   # merged before the crash, not yet removed
            return
        if not st.exists(leaf):                # the freeze cut short after its rename
            datapath._freeze([{"disk": disk, "frozen_path": spare, "leaf_path": leaf}],
                             hidden=True)
        if parent_or_none(leaf) == spare:
            datapath.do_commit({"path": node, "child_path": spare, "disk": disk,
                                "grandchildren": [{"path": leaf}]})
    elif not st.exists(leaf):                  # the last rename cut short after the removal
        st.make_leaf(node)
        st.replace(node, leaf)
