"""Failures of the surroundings end in one ``error: ...`` line and the documented exit code
(README: 0 ok, 1 failed, 2 usage), never a traceback: an unusable state directory, a reader
of the output that goes away, a bad --max-depth, a tool that is not installed. Each through
the livesnap service and in the command's own process."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ROOT

VIA = ["service", "own-process"]


def livesnap(dom, via, *args, env_extra=None, user=None):
    env = dom.env()
    if via == "own-process" or not os.environ.get("LIVESNAP_SERVICE"):
        env["LIVESNAP_SERVICE"] = "off"
    env.update(env_extra or {})
    kw = {}
    if user is not None:
        kw = dict(user=user, group=user, extra_groups=[])
    return subprocess.run([sys.executable, "-m", "livesnap"] + [str(a) for a in args],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=120, **kw)


def one_error(p, rc, *words):
    assert p.returncode == rc, (p.returncode, p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, p.stderr
    for w in words:
        assert w in p.stderr, p.stderr


@pytest.fixture
def mounts():
    made = []

    def mount(*args):
        subprocess.run(["mount"] + list(args), check=True)
        made.append(args[-1])
    yield mount
    for m in reversed(made):
        subprocess.run(["umount", m])


@pytest.mark.parametrize("via", VIA)
def test_a_state_dir_that_is_not_a_directory(make_dom, tmp_path, via):
    dom = make_dom(ndisks=1)
    plain = tmp_path / "plain"
    plain.write_text("not a directory")
    for state in (str(plain), str(plain / "below")):
        for args in (["snapshot-create", dom.name, "s1"], ["snapshot-list", dom.name],
                     ["check", dom.name]):
            one_error(livesnap(dom, via, *args, "--state-dir", state), 1,
                      "state directory %s" % state)
        # the same from the environment
        one_error(livesnap(dom, via, "snapshot-create", dom.name, "s1",
                           env_extra={"LIVESNAP_STATE_DIR": state}), 1, state)
    assert plain.read_text() == "not a directory"
    assert not os.path.exists(dom.state_dir)


@pytest.mark.parametrize("via", VIA)
def test_a_state_dir_where_no_file_can_be_made(make_dom, via):
    dom = make_dom(ndisks=1)
    for state in ("/proc/self", "/proc/self/fd", "/sys/kernel"):
        for args in (["snapshot-create", dom.name, "s1"], ["recover", dom.name],
                     ["snapshot-list", dom.name]):
            one_error(livesnap(dom, via, *args, "--state-dir", state), 1, state)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts file systems")
@pytest.mark.parametrize("via", VIA)
def test_a_read_only_state_dir(make_dom, tmp_path, mounts, via):
    """An empty read-only tmpfs, and a read-only bind mount of a state directory with the
    domain's catalog in it."""
    dom = make_dom(ndisks=1)
    empty = tmp_path / "ro-empty"
    empty.mkdir()
    mounts("-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(empty))
    for state in (str(empty), str(empty / "sub")):
        one_error(livesnap(dom, via, "snapshot-create", dom.name, "s1", "--state-dir", state),
                  1, state, "Read-only file system")
    assert livesnap(dom, via, "snapshot-create", dom.name, "s1").returncode == 0
    ro = tmp_path / "ro-bind"
    ro.mkdir()
    mounts("--bind", "-o", "ro", dom.state_dir, str(ro))
    for args in (["snapshot-create", dom.name, "s2"], ["snapshot-delete", dom.name, "s1"],
                 ["check", dom.name], ["snapshot-list", dom.name]):
        one_error(livesnap(dom, via, *args, "--state-dir", str(ro)), 1, str(ro))
    listed = json.loads(livesnap(dom, via, "snapshot-list", dom.name, "--json").stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]


XEN_XML = ("<domain type='xen'><name>lst-xen-nobody</name>"
           "<uuid>6f2b3c4d-1111-2222-3333-444455556666</uuid><memory>65536</memory>"
           "<os><type>hvm</type></os><devices></devices></domain>")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a command as another user")
def test_a_state_dir_without_permission_for_a_non_root_caller(make_dom):
    """uid 65534 (a Xen domain described by an XML file: no libvirt connection needed);
    the service serves only its own uid, so the command runs in the caller's process."""
    dom = make_dom(ndisks=1)
    top = tempfile.mkdtemp(prefix="livesnap-perm-", dir="/tmp")
    try:
        os.chmod(top, 0o755)
        xml = os.path.join(top, "dom.xml")
        with open(xml, "w") as f:
            f.write(XEN_XML)
        os.chmod(xml, 0o644)
        private = os.path.join(top, "private")
        os.mkdir(private, 0o700)
        shared = os.path.join(top, "shared")                   # root's, 0755
        os.mkdir(shared, 0o755)
        for state in (private, os.path.join(private, "sub"), os.path.join(shared, "sub"),
                      shared):
            for via in VIA:
                for args in (["snapshot-create", "lst-xen-nobody", "s1"],
                             ["snapshot-list", "lst-xen-nobody"]):
                    p = livesnap(dom, via, *args, "--domain-xml", xml, "--state-dir", state,
                                 user=65534)
                    one_error(p, 1, state)
        assert os.listdir(shared) == [] and os.listdir(private) == []
    finally:
        shutil.rmtree(top)
