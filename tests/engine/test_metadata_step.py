"""libvirt's snapshot metadata brought back in step with the catalog by ``recover`` (issue 16,
class 6): a SIGKILL between the catalog's commit and the metadata update, a definition
removed by hand; ``check`` says that ``recover`` fixes it. A snapshot livesnap never had is
left alone."""
import pytest

import libvirt


def libvirt_tree(dom):
    out = {}
    for s in dom.dom.listAllSnapshots(0):
        try:
            out[s.getName()] = s.getParent(0).getName()
        except libvirt.libvirtError:
            out[s.getName()] = None
    return out


def livesnap_tree(dom):
    return {s["name"]: s["parent"] for s in dom.json("snapshot-list", dom.name)["snapshots"]}


def assert_out_of_step_then_recovered(dom):
    assert libvirt_tree(dom) != livesnap_tree(dom)
    chk = dom.cli("check", dom.name, expect=1)
    assert "livesnap recover %s" % dom.name in chk.stdout, chk.stdout
    proc = dom.cli("recover", dom.name)
    assert "brought in step" in proc.stdout, proc.stdout
    assert libvirt_tree(dom) == livesnap_tree(dom)
    assert dom.json("check", dom.name)["ok"]
    again = dom.json("recover", dom.name)
    assert again["recovered"] is None and again["metadata"] == []


def setup_create(dom):
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 1, 0)
    return ["snapshot-create", dom.name, "s2"], "create"


def setup_delete_merge(dom):
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s2")
    dom.write("vda", 2, 0)
    return ["snapshot-delete", dom.name, "s1"], "delete"


def setup_revert_keep(dom):
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 1, 0)
    return ["snapshot-revert", dom.name, "s1", "--keep-current", "k"], "revert"


@pytest.mark.parametrize("scenario", [setup_create, setup_delete_merge, setup_revert_keep],
                         ids=lambda f: f.__name__[6:])
def test_kill_between_catalog_commit_and_metadata_update(make_dom, scenario):
    dom = make_dom(ndisks=2)
    args, op = scenario(dom)
    proc = dom.cli(*args, env_extra={"LIVESNAP_FAULT": "%s:committed:0" % op}, expect=None)
    assert proc.returncode == -9, proc.stderr
    if args[0] == "snapshot-delete":
        assert "s1" in libvirt_tree(dom) and "s1" not in livesnap_tree(dom)
    assert_out_of_step_then_recovered(dom)


def test_a_definition_removed_by_hand_is_redefined(make_dom):
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "s1")
    dom.json("snapshot-create", dom.name, "s2")
    dom.dom.snapshotLookupByName("s1", 0).delete(
        libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    assert_out_of_step_then_recovered(dom)
    assert libvirt_tree(dom) == {"s1": None, "s2": "s1"}


def foreign_xml(dom, name):
    return ("<domainsnapshot><name>%s</name><state>shutoff</state>"
            "<creationTime>1</creationTime><memory snapshot='no'/>%s</domainsnapshot>"
            % (name, dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))


def test_a_snapshot_livesnap_never_had_is_left_alone(make_dom):
    """Added by hand (metadata only): ``check`` names it as not livesnap's, ``recover`` and
    the next operations keep it; livesnap's own definitions are still brought in step."""
    dom = make_dom(ndisks=1)
    dom.json("snapshot-create", dom.name, "s1")
    dom.dom.snapshotCreateXML(foreign_xml(dom, "foreign"),
                              libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE)
    chk = dom.cli("check", dom.name, expect=1)
    assert "'foreign' that livesnap did not make" in chk.stdout, chk.stdout
    assert "differs" not in chk.stdout
    dom.dom.snapshotLookupByName("s1", 0).delete(
        libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
    rec = dom.json("recover", dom.name)
    assert rec["metadata"] == [["defined", "s1"]]
    assert sorted(libvirt_tree(dom)) == ["foreign", "s1"]
    dom.json("snapshot-create", dom.name, "s2")
    dom.json("snapshot-delete", dom.name, "s1")
    assert sorted(libvirt_tree(dom)) == ["foreign", "s2"]
    assert dom.json("recover", dom.name)["metadata"] == []
    assert sorted(libvirt_tree(dom)) == ["foreign", "s2"]
