"""Running the libvirt hook as libvirtd does, and reading a domain's catalog directly."""
import json
import os
import sqlite3
import subprocess
import time

from helpers import ROOT

# what libvirtd gives a hook: a minimal environment (no LIVESNAP_STATE_DIR)
HOOK_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C"}
REPO_HOOK = os.path.join(ROOT, "hooks", "qemu.d", "livesnap")
HOOK_BUDGET_S = 1.0


def run_hook(path, name, op, xml, subop="begin", extra="-", env=None, argv0=None):
    """Run a hook as libvirtd does: argv ``name op sub-op extra``, the domain XML on stdin,
    stdout and stderr read to their end. Returns (process, seconds)."""
    cmd = (argv0 or []) + [path, name, op, subop, extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, input=xml, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env or HOOK_ENV, timeout=30, cwd="/")
    return proc, time.monotonic() - t0


def catalog_path(dom):
    return os.path.join(dom.state_dir, dom.dom.UUIDString() + ".db")


def query(dom, sql, args=()):
    db = sqlite3.connect(catalog_path(dom))
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def unfinished(dom):
    """[(op, status, datapath)] of the interrupted operations in the catalog."""
    return [(op, status, json.loads(plan)["result"].get("datapath"))
            for op, status, plan in query(dom, "SELECT op, status, plan FROM operations WHERE "
                                               "status IN ('running', 'failed')")]


def hide(dom, snapshot):
    """Make a visible snapshot hidden in the catalog, as if deleted logically and left with
    fewer than two children: the state a reclaim exists for. (livesnap itself reclaims a
    hidden node in the same operation that leaves it with one child, so the catalog is
    edited directly; the images are untouched and stay consistent with it.)"""
    db = sqlite3.connect(catalog_path(dom), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE snapshots SET state='hidden' WHERE name=?", (snapshot,))
        db.execute("UPDATE nodes SET state='hidden' WHERE snapshot=?", (snapshot,))
        db.execute("COMMIT")
    finally:
        db.close()
    kids = query(dom, "SELECT n.id, (SELECT COUNT(*) FROM nodes c WHERE c.parent=n.id) "
                      "FROM nodes n WHERE n.snapshot=?", (snapshot,))
    assert kids and all(k < 2 for _, k in kids), kids


def hidden_snapshots(dom):
    return [s["name"] for s in dom.json("snapshot-list", dom.name, "--all")["snapshots"]
            if s["state"] == "hidden"]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.2)




def interrupt_revert(dom):
    """A revert (offline datapath) SIGKILLed after its first step: left in the journal."""
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 0)
    proc = dom.cli("snapshot-revert", dom.name, "s1",
                   env_extra={"LIVESNAP_FAULT": "revert:after:0"}, expect=None)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert unfinished(dom) == [("revert", "running", "offline")]


def reclaim_log(dom):
    """What the hook's detached reclaims wrote (their argv, output and exit status)."""
    path = os.path.join(dom.state_dir, dom.dom.UUIDString() + ".reclaim.log")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()
