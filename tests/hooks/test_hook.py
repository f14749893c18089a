"""The libvirt qemu hook run as libvirtd runs it: argv ``<domain> <op> <sub-op> <extra>``, the
domain XML on stdin, a minimal environment, stdout/stderr read to their end. Every call must
return in well under a second."""
import os
import sqlite3
import stat
import sys
import time
import uuid

from hook_helpers import (HOOK_BUDGET_S, REPO_HOOK, catalog_path, hidden_snapshots, hide,
                          interrupt_revert, query, reclaim_log, run_hook, unfinished, wait_for)

OPS = [("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"),
       ("release", "end"), ("reconnect", "begin"), ("migrate", "begin"), ("restore", "begin")]


def test_install_bakes_state_dir_and_python(make_dom, tmp_path):
    dom = make_dom(ndisks=1)
    hooks = str(tmp_path / "hooks")
    proc = dom.cli("install-hooks", "--hooks-dir", hooks, "--state-dir", dom.state_dir)
    path = os.path.join(hooks, "qemu.d", "livesnap")
    assert "installed %s" % path in proc.stdout
    assert "restart libvirtd" in proc.stdout           # qemu.d was new
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    with open(path) as f:
        text = f.read()
    assert text.startswith("#!%s\n" % sys.executable)
    assert "STATE_DIR = %r" % dom.state_dir in text
    assert "URI = 'qemu:///system'" in text
    assert [n for n in os.listdir(os.path.dirname(path))] == ["livesnap"]   # no temp file left
    # a second install replaces the file; libvirtd already knows a hook: no reminder
    r = dom.json("install-hooks", "--hooks-dir", hooks, "--state-dir", dom.state_dir)
    assert r["installed"] == path and r["restart_libvirtd"] is False
    assert r["state_dir"] == dom.state_dir and r["python"] == sys.executable
    r = dom.json("install-hooks", "--hooks-dir", hooks, "--uninstall")
    assert r["removed"] == path and not os.path.exists(path)
    proc = dom.cli("install-hooks", "--hooks-dir", hooks, "--uninstall")
    assert "was not installed" in proc.stdout


def test_unknown_domain_every_op_is_harmless(make_dom, install_hook):
    dom = make_dom(ndisks=1)
    hook = install_hook(dom)
    other = ("<domain type='kvm'><name>lst-hook-other</name><uuid>%s</uuid></domain>"
             % uuid.uuid4())
    for op, subop in OPS:
        for xml in (other, "", "not xml", "<domain><name>x</name></domain>",
                    "<domain><uuid>../../%s</uuid></domain>" % os.path.basename(dom.state_dir)):
            proc, took = run_hook(hook, "lst-hook-other", op, xml, subop)
            assert proc.returncode == 0, (op, xml, proc.stderr)
            assert proc.stdout == "" and proc.stderr == ""
            assert took < HOOK_BUDGET_S, (op, took)
    assert not os.path.exists(dom.state_dir)            # the hook creates nothing


def test_prepare_refuses_interrupted_offline_operation(make_dom, install_hook):
    dom = make_dom(ndisks=1)
    interrupt_revert(dom)
    hook = install_hook(dom)
    xml = dom.dom.XMLDesc(0)
    before = dom.fingerprint()

    proc, took = run_hook(hook, dom.name, "prepare", xml)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "livesnap recover %s" % dom.name in lines[0] and "revert" in lines[0]
    assert took < HOOK_BUDGET_S
    # only prepare refuses; the other operations pass (release starts no reclaim either)
    for op, subop in OPS:
        if op != "prepare":
            proc, took = run_hook(hook, dom.name, op, xml, subop)
            assert (proc.returncode, proc.stderr) == (0, ""), op
            assert took < HOOK_BUDGET_S
    # a writer holding the catalog does not block the hook
    db = sqlite3.connect(catalog_path(dom), isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE meta SET value=value WHERE key='schema'")
        proc, took = run_hook(hook, dom.name, "prepare", xml)
        assert proc.returncode == 1 and took < HOOK_BUDGET_S
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert dom.fingerprint() == before                  # the hook changed nothing

    dom.json("recover", dom.name)
    assert unfinished(dom) == []
    proc, took = run_hook(hook, dom.name, "prepare", dom.dom.XMLDesc(0))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert took < HOOK_BUDGET_S


def test_repository_launcher_reads_the_environment(make_dom):
    dom = make_dom(ndisks=1)
    interrupt_revert(dom)
    env = {"PATH": "/usr/bin:/bin", "LIVESNAP_STATE_DIR": dom.state_dir}
    proc, took = run_hook(REPO_HOOK, dom.name, "prepare", dom.dom.XMLDesc(0), env=env,
                          argv0=[sys.executable])
    assert proc.returncode == 1 and "livesnap recover %s" % dom.name in proc.stderr
    # without the state directory it looks in /var/lib/livesnap, where this domain has none
    proc, took = run_hook(REPO_HOOK, dom.name, "prepare", dom.dom.XMLDesc(0),
                          env={"PATH": "/usr/bin:/bin"}, argv0=[sys.executable])
    assert proc.returncode == 0


def test_prepare_allows_interrupted_live_operation(make_dom, install_hook):
    dom = make_dom(ndisks=1)
    dom.dom.create()
    try:
        proc = dom.cli("snapshot-create", dom.name, "s1",
                       env_extra={"LIVESNAP_FAULT": "create:after:0"}, expect=None)
        assert proc.returncode == -9, (proc.returncode, proc.stderr)
        assert unfinished(dom) == [("create", "running", "libvirt-live")]
        hook = install_hook(dom)
        proc, took = run_hook(hook, dom.name, "prepare", dom.dom.XMLDesc(0))
        assert (proc.returncode, proc.stderr) == (0, "")
        assert took < HOOK_BUDGET_S
    finally:
        dom.dom.destroy()


def test_release_starts_detached_reclaim(make_dom, install_hook):
    dom = make_dom(ndisks=1)
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 65536)
    dom.json("snapshot-create", dom.name, "s2")
    dom.write("vda", 3, 131072)
    digests = dom.digests()
    hide(dom, "s1")                       # hidden, one child (s2's node): reclaimable
    assert hidden_snapshots(dom) == ["s1"]
    hook = install_hook(dom)
    xml = dom.dom.XMLDesc(0)

    # an interrupted operation first: release must leave everything to 'livesnap recover'
    proc = dom.cli("snapshot-create", dom.name, "s3",
                   env_extra={"LIVESNAP_FAULT": "create:after:0"}, expect=None)
    assert proc.returncode == -9
    proc, took = run_hook(hook, dom.name, "release", xml, "end", "shutdown")
    assert (proc.returncode, proc.stderr) == (0, "") and took < HOOK_BUDGET_S
    time.sleep(2)
    assert hidden_snapshots(dom) == ["s1"]
    rec = dom.json("recover", dom.name)
    # the recovered create reclaimed s1 itself (a create reclaims what it can); make another
    # reclaimable node for the release hook
    assert rec["result"]["reclaimed"] == ["s1"] and hidden_snapshots(dom) == []
    hide(dom, "s2")
    digests = dom.digests()
    xml = dom.dom.XMLDesc(0)

    proc, took = run_hook(hook, dom.name, "release", xml, "end", "shutdown")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert took < HOOK_BUDGET_S
    # the hook returned before the reclaim (a new Python, libvirt, qemu-img) could finish
    assert query_hidden_nodes(dom) == 1
    wait_for(lambda: "exit " in reclaim_log(dom), 60, "the detached reclaim to finish")
    assert reclaim_log(dom).endswith("reclaimed: s2\nexit 0\n"), reclaim_log(dom)
    assert hidden_snapshots(dom) == [] and query_hidden_nodes(dom) == 0
    assert len(query(dom, "SELECT id FROM nodes")) == 3     # base, s3, active: s1, s2 merged
    assert dom.digests() == digests
    assert dom.json("check", dom.name)["ok"]
    # nothing left to reclaim: release is a no-op
    proc, took = run_hook(hook, dom.name, "release", dom.dom.XMLDesc(0), "end", "shutdown")
    assert proc.returncode == 0 and took < HOOK_BUDGET_S


def query_hidden_nodes(dom):
    db = sqlite3.connect("file:%s?mode=ro" % catalog_path(dom), uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM nodes WHERE state='hidden'").fetchone()[0]
    finally:
        db.close()
