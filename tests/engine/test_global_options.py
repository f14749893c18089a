"""Global options before the command, in virsh's order (issue 14 item 6): ``livesnap -c URI
--state-dir D --output json snapshot-list vm1`` does what ``livesnap snapshot-list vm1 -c URI
--state-dir D --output json`` does, through the service and in a process of its own, and
the program's own options and usage errors are unchanged."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, URI


def run(argv, env_extra=None, service=True):
    env = dict(os.environ)
    env.pop("LIVESNAP_STATE_DIR", None)
    env.pop("LIBVIRT_DEFAULT_URI", None)
    if not service:
        env["LIVESNAP_SERVICE"] = "off"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "livesnap"] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("service", [True, False], ids=["service", "own-process"])
def test_global_options_before_the_command_as_after_it(make_dom, tmp_path, service):
    d = make_dom()
    state = str(tmp_path / "elsewhere")
    after = run(["snapshot-create", d.name, "s1", "-c", URI, "--state-dir", state,
                 "--output", "json"], service=service)
    assert after.returncode == 0, after.stderr
    before = run(["-c", URI, "--state-dir", state, "--output", "json", "--max-depth", "5",
                  "snapshot-list", d.name], service=service)
    assert before.returncode == 0, before.stderr
    listed = json.loads(before.stdout)
    assert [s["name"] for s in listed["snapshots"]] == ["s1"]
    # the state directory given first was the one used (the default holds nothing of d)
    assert any(f.endswith(".db") for f in os.listdir(state))
    # mixed: some before, some after; --json and --connect=URI spellings
    mixed = run(["--connect=" + URI, "--json", "snapshot-list", d.name, "--state-dir", state],
                service=service)
    assert mixed.returncode == 0, mixed.stderr
    assert json.loads(mixed.stdout) == listed
    # a bad value before the command is the same usage error as after it
    bad = run(["--max-depth", "0", "-c", URI, "snapshot-list", d.name], service=service)
    assert bad.returncode == 2 and "--max-depth" in bad.stderr, bad.stderr


def test_program_options_and_usage_errors_are_unchanged():
    version = run(["--version"])
    assert version.returncode == 0 and version.stdout.startswith("livesnap ")
    helped = run(["--help"])
    assert helped.returncode == 0 and "snapshot-create" in helped.stdout
    no_command = run(["-c", URI])
    assert no_command.returncode == 2 and "usage:" in no_command.stderr
    unknown = run(["--no-such-option", "snapshot-list", "x"])
    assert unknown.returncode == 2 and "--no-such-option" in unknown.stderr
    # commands with parsers of their own are left as they are
    vhd = run(["vhd", "--help"])
    assert vhd.returncode == 0 and "vhd-util" in vhd.stdout


def test_reorder_moves_only_what_precedes_the_command():
    from livesnap.argv import reorder
    assert reorder(["-c", "qemu:///x", "snapshot-list", "vm", "--tree"]) == \
        ["snapshot-list", "-c", "qemu:///x", "vm", "--tree"]
    assert reorder(["snapshot-list", "vm", "-c", "u"]) == ["snapshot-list", "vm", "-c", "u"]
    assert reorder(["--debug", "--output", "json", "check", "vm"]) == \
        ["check", "--debug", "--output", "json", "vm"]
    assert reorder(["--version"]) == ["--version"]
    assert reorder(["-c"]) == ["-c"]
    assert reorder(["-q", "vhd", "query"]) == ["-q", "vhd", "query"]
    once = reorder(["--state-dir", "/s", "recover", "vm"])
    assert reorder(once) == once
