"""The Python API in a process forked from one that used it (a worker pool, a daemon that
forks per request): libvirt's event loop does not survive the fork, so block jobs there are
followed by reading their state, and a live merge still completes."""
import json
import os

from helpers import URI


def _in_child(fn):
    """Run ``fn()`` in a forked child; its JSON-able result, or the exception's text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": fn()}
        except BaseException as e:  # noqa: B902 - reported to the parent
            out = {"error": "%s: %s" % (type(e).__name__, e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data.decode())


def test_a_live_merge_in_a_forked_child_of_an_api_user(make_dom):
    from livesnap.engine.engine import Engine
    from livesnap.platforms import libvirt_domain

    dom = make_dom(ndisks=1)
    dom.dom.create()                  # no bootable disk: the firmware idles, QEMU runs
    api = Engine(connect=URI, state_dir=dom.state_dir)
    api.create(dom.name, "a")         # this process now runs libvirt's event loop
    api.create(dom.name, "b")
    before = dom.digests()
    assert libvirt_domain.events_delivered()

    def child():
        assert not libvirt_domain.events_delivered()
        r = Engine(connect=URI, state_dir=dom.state_dir).delete(dom.name, "b")
        return {"action": r["action"], "methods": [m["method"] for m in r.get("merges", [])]}

    out = _in_child(child)
    assert "error" not in out, out["error"]
    assert out["ok"]["action"] == "merged", out
    assert [s["name"] for s in api.snapshot_list(dom.name)["snapshots"]] == ["a"]
    assert dom.digests() == before    # the running disk reads as it did
    assert api.check(dom.name)["ok"]
