"""The hook installed by ``livesnap install-hooks`` into /etc/libvirt/hooks and run by the real
libvirtd: ``virsh start`` of a domain with an interrupted offline operation fails with the
hook's message until ``livesnap recover``; ``virsh destroy`` starts the reclaim of a hidden
node, detached.

libvirtd looks for hooks only when it starts and when it reloads (SIGHUP), but once it has
found a qemu hook in qemu.d it rereads qemu.d on every hook call (libvirt's virhook.c):
scripts/start-libvirtd.sh puts a no-op hook there before libvirtd starts, so the hook installed
here runs without a reload. The tests never reload libvirtd: a reload overlapping another
test's snapshot can put back a stale definition or crash libvirtd (libvirt 9.0). The installed
hook has a private state directory baked in, so other domains are not affected.
"""
import os
import subprocess
import time

import pytest

from helpers import URI
from hook_helpers import hidden_snapshots, hide, interrupt_revert, query, reclaim_log, wait_for

# one module fixture installs the hook host-wide: two pytest-xdist workers must not install
# and remove it at once. The group keeps this module in one worker (--dist loadgroup), but
# pytest 9.2 + xdist 3.8.0 ignore groups (pytest-dev/pytest-xdist#1386): the fixture also
# holds an flock for as long as its hook is installed.
pytestmark = pytest.mark.xdist_group(name="libvirtd-system-hook")
LOCK = "/run/livesnap-test-system-hook.lock"

HOOKS_DIR = "/etc/libvirt/hooks"
INSTALLED = os.path.join(HOOKS_DIR, "qemu.d", "livesnap")
KEEP = os.path.join(HOOKS_DIR, "qemu.d", "00-livesnap-test-keep")    # scripts/start-libvirtd.sh


def virsh(*args):
    return subprocess.run(["virsh", "-c", URI] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


@pytest.fixture(scope="module")
def system_hook(tmp_path_factory):
    """The hook installed for the real libvirtd, with a private state directory."""
    import fcntl
    from helpers import Cli
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)     # another worker's module fixture: wait for its end
        assert not os.path.exists(INSTALLED), "a livesnap hook is already installed"
        assert os.access(KEEP, os.X_OK), \
            "%s missing: run scripts/start-libvirtd.sh (it reloads a running libvirtd once)" % KEEP
        cli = Cli()
        cli.state_dir = str(tmp_path_factory.mktemp("hook-state"))
        try:
            proc = cli.cli("install-hooks", "--hooks-dir", HOOKS_DIR, "--state-dir",
                           cli.state_dir)
            assert INSTALLED in proc.stdout
            yield cli.state_dir
        finally:
            cli.cli("install-hooks", "--hooks-dir", HOOKS_DIR, "--uninstall", expect=None)
        assert not os.path.exists(INSTALLED)


def test_virsh_start_refused_until_recover(make_dom, system_hook):
    dom = make_dom(ndisks=1)
    dom.state_dir = system_hook
    interrupt_revert(dom)

    proc = virsh("start", dom.name)
    assert proc.returncode != 0, proc.stdout
    assert "livesnap recover %s" % dom.name in proc.stderr, proc.stderr
    assert not dom.dom.isActive()

    dom.json("recover", dom.name)
    t0 = time.monotonic()
    proc = virsh("start", dom.name)
    assert proc.returncode == 0, proc.stderr
    assert dom.dom.isActive()
    assert time.monotonic() - t0 < 10
    dom.dom.destroy()


def test_virsh_destroy_starts_detached_reclaim(make_dom, system_hook):
    dom = make_dom(ndisks=1)
    dom.state_dir = system_hook
    dom.write("vda", 1, 0)
    dom.json("snapshot-create", dom.name, "s1")
    dom.write("vda", 2, 65536)
    digests = dom.digests()
    assert virsh("start", dom.name).returncode == 0
    hide(dom, "s1")                         # hidden with one child (the active leaf)
    proc = virsh("destroy", dom.name)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: "exit " in reclaim_log(dom), 60, "the detached reclaim to finish")
    assert reclaim_log(dom).endswith("reclaimed: s1\nexit 0\n"), reclaim_log(dom)
    assert hidden_snapshots(dom) == []
    assert len(query(dom, "SELECT id FROM nodes")) == 2     # base and the active leaf
    assert dom.digests() == digests
    assert dom.json("check", dom.name)["ok"]
