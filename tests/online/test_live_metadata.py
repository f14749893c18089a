"""libvirt's snapshot metadata of a running domain brought back in step by ``recover`` after a
SIGKILL between the catalog's commit and the metadata update (issue 16, class 6, on the
libvirt-live datapath: libvirt keeps these as disk-only snapshots of a running domain)."""


def libvirt_tree(live):
    import libvirt
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.lookupByName(live.name)
        out = {}
        for s in dom.listAllSnapshots(0):
            try:
                out[s.getName()] = s.getParent(0).getName()
            except libvirt.libvirtError:
                out[s.getName()] = None
        return out
    finally:
        conn.close()


def livesnap_tree(live):
    return {s["name"]: s["parent"] for s in live.json("snapshot-list", live.name)["snapshots"]}


def test_kill_after_the_catalog_commit_while_the_guest_writes(live):
    live.start()
    g = live.guest
    live.create("s1")
    g.wait_acks(5)
    live.create("s2")
    g.wait_acks(5)
    for args, op in ((["snapshot-delete", live.name, "s1"], "delete"),
                     (["snapshot-create", live.name, "s3"], "create")):
        proc = live.cli(*args, env_extra={"LIVESNAP_FAULT": "%s:committed:0" % op},
                        expect=None)
        assert proc.returncode == -9, proc.stderr
        assert g.is_active()
        assert libvirt_tree(live) != livesnap_tree(live)
        chk = live.cli("check", live.name, expect=1)
        assert "livesnap recover %s" % live.name in chk.stdout, chk.stdout
        rec = live.json("recover", live.name)
        assert rec["recovered"] is None and rec["metadata"], rec
        assert libvirt_tree(live) == livesnap_tree(live)
        assert live.json("check", live.name)["ok"]
    assert livesnap_tree(live) == {"s2": None, "s3": "s2"}
    g.wait_acks(2)                          # still writing
    live.stop_and_verify()
