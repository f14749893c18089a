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


def livesnap_to_a_closed_pipe(dom, via, *args, env_extra=None):
    """The command with its standard output a pipe whose reader has already gone (as
    ``livesnap ... | head`` once head has exited)."""
    env = dict(dom.env(), **(env_extra or {}))
    if via == "own-process" or not os.environ.get("LIVESNAP_SERVICE"):
        env["LIVESNAP_SERVICE"] = "off"
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "livesnap"] + [str(a) for a in args],
                              env=env, cwd=ROOT, stdout=w, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(w)


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_to_a_reader_that_has_gone_ends_quietly(make_dom, via, unbuffered):
    """JSON, text and --help output into a closed pipe, written at once (PYTHONUNBUFFERED)
    or at exit: no traceback, no message, exit status 141 (128 + SIGPIPE, documented); a
    snapshot-create whose output is lost is still done."""
    dom = make_dom(ndisks=1)
    env = {"PYTHONUNBUFFERED": unbuffered}
    for args in (["snapshot-create", dom.name, "s1", "--json"],
                 ["snapshot-list", dom.name, "--json"], ["snapshot-list", dom.name, "--tree"],
                 ["snapshot-list", "--help"], ["--help"], ["--version"],
                 ["check", dom.name, "--json"]):
        p = livesnap_to_a_closed_pipe(dom, via, *args, env_extra=env)
        assert (p.returncode, p.stderr) == (141, ""), (args, p.stderr)
    listed = json.loads(livesnap(dom, via, "snapshot-list", dom.name, "--json").stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]
    # an error is still reported as one (stderr is not the broken pipe)
    p = livesnap_to_a_closed_pipe(dom, via, "snapshot-list", "no-such-domain-xyz", "--json",
                                  env_extra=env)
    assert p.returncode == 1 and p.stderr.startswith("error: "), p.stderr


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("depth", ["0", "-1", "-30", "1.5", "x"])
def test_max_depth_below_one_is_a_usage_error(make_dom, via, depth):
    dom = make_dom(ndisks=1)
    p = livesnap(dom, via, "snapshot-create", dom.name, "s1", "--max-depth", depth)
    assert p.returncode == 2 and "--max-depth" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(dom.state_dir)


def test_max_depth_below_one_is_refused_by_the_engine_too():
    from livesnap.engine.engine import Engine
    from livesnap.errors import UsageError
    for depth in (0, -1, True, 2.5, "3", None):
        with pytest.raises(UsageError):
            Engine(max_depth=depth)
    assert Engine(max_depth=1).max_depth == 1


@pytest.mark.parametrize("via", VIA)
def test_a_tool_that_is_not_installed_is_named_not_given_an_exit_status(make_dom, tmp_path, via):
    """QEMU_IMG, TAP_CTL (a Xen domain: `tap-ctl list`), tap-ctl not on PATH, a tool that
    is not executable: "command not found: ..." / "cannot run ...", never "rc=127
    (EKEYEXPIRED)"."""
    dom = make_dom(ndisks=1)
    xml = tmp_path / "xen.xml"
    xml.write_text(XEN_XML)
    xen = ["snapshot-create", "lst-xen-nobody", "s1", "--domain-xml", str(xml)]
    cases = [(["snapshot-create", dom.name, "s1"], {"QEMU_IMG": "/nonexistent/qemu-img"},
              "error: command not found: /nonexistent/qemu-img\n"),
             (xen, {"TAP_CTL": "/nonexistent/tap-ctl"},
              "error: command not found: /nonexistent/tap-ctl\n"),
             (xen, {"TAP_CTL": "", "PATH": str(tmp_path)}, "error: command not found: tap-ctl\n"),
             (xen, {"TAP_CTL": str(tmp_path)}, "error: cannot run %s: Permission denied\n"
              % tmp_path)]
    for args, env, message in cases:
        p = livesnap(dom, via, *args, env_extra=env)
        assert (p.returncode, p.stderr) == (1, message), (env, p.stderr)
    assert not os.path.exists(dom.state_dir) or not any(
        f.endswith(".db") and os.path.getsize(os.path.join(dom.state_dir, f)) == 0
        for f in os.listdir(dom.state_dir))


def test_the_runner_never_renders_an_exit_status_as_an_errno():
    from livesnap.errors import CommandFailed, CommandNotFound
    from livesnap.tools import runner, tap_ctl
    with pytest.raises(CommandNotFound) as e:
        runner.run_rc(["/nonexistent/tap-ctl", "list"])
    assert str(e.value) == "command not found: /nonexistent/tap-ctl"
    assert not isinstance(e.value, CommandFailed)  # not the image's fault (BadImage maps those)
    with pytest.raises(CommandFailed) as e:
        runner.run(["sh", "-c", "exit 127"])
    assert "rc=127" in str(e.value) and "EKEY" not in str(e.value)
    assert "EKEY" not in tap_ctl._reason(127, "", "sh: tap-ctl: not found")
    assert "(EPROTO)" in tap_ctl._reason(71, "", "")
