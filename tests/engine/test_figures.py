"""The JSON names what each figure is: on libvirt livesnap cannot time the guest's IO pause,
only the API call that pauses it (a disk-only snapshot, a pivot); that duration is given as
``call_ms``, and ``pause_ms`` is then an upper bound (``pause_measured``: "call")."""


def test_libvirt_figures_are_named_as_call_durations(make_dom):
    dom = make_dom(ndisks=1)
    r = dom.json("snapshot-create", dom.name, "off")          # shut off: no pause at all
    assert r["pause_ms"] is None and r["call_ms"] is None and r["pause_measured"] is None
    dom.dom.create()              # no bootable disk: the firmware idles, QEMU runs
    try:
        r = dom.json("snapshot-create", dom.name, "on")
        assert r["datapath"] == "libvirt-live"
        assert r["pause_measured"] == "call" and r["call_ms"] == r["pause_ms"] > 0
        assert [p["measured"] for p in r["pauses"]] == ["call"]
        text = dom.cli("snapshot-create", dom.name, "on2").stdout
        assert "paused at most" in text and "the libvirt call's duration" in text, text
        r = dom.json("snapshot-delete", dom.name, "on2")       # into the active image
        assert r["merges"] and all(m["call_ms"] == m["pause_ms"] for m in r["merges"]), r
        assert r["call_ms"] == r["pause_ms"]
    finally:
        dom.dom.destroy()
