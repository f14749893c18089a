"""Each failure the plugin reports: ``LIVESNAP_<CODE> [message, details-json]`` (and the
protocol's own codes), always one methodResponse on stdout, exit 0."""
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import uuid
import xmlrpc.client

from livesnap import errors
from livesnap.engine.engine import Interrupted
from livesnap.lock import DomainLock
from livesnap.platforms.xapi import XapiError
from livesnap.tools.tap_ctl import PauseTimeout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN = os.path.join(ROOT, "xapi_plugin", "livesnap")


def load_plugin():
    loader = importlib.machinery.SourceFileLoader("livesnap_xapi_plugin", PLUGIN)
    spec = importlib.util.spec_from_loader("livesnap_xapi_plugin", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_not_found_duplicate_busy(world):
    vm = world.add_vm()
    desc = world.fail("snapshot_list", {"vm_uuid": str(uuid.uuid4())}, "LIVESNAP_VM_NOT_FOUND")
    assert json.loads(desc[2])["error"] == "DomainNotFound"
    desc = world.fail("snapshot_delete", {"vm_uuid": vm.uuid, "name": "nope"},
                      "LIVESNAP_SNAPSHOT_NOT_FOUND")
    assert "nope" in desc[1] and json.loads(desc[2])["snapshot"] == "nope"
    world.ok("snapshot_create", vm_uuid=vm.uuid, name="s1")
    before = world.snapshot_of_files()
    world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"}, "LIVESNAP_DUPLICATE_NAME")
    world.fail("snapshot_revert", {"vm_uuid": vm.uuid, "name": "s1", "keep_current": "s1"},
               "LIVESNAP_DUPLICATE_NAME")
    with DomainLock(os.path.join(world.state_dir, vm.uuid + ".lock"), "vm1"):
        world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"}, "LIVESNAP_BUSY")
    world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s2", "disks": "xvdq"},
               "LIVESNAP_INVALID_ARGUMENT")
    after = world.snapshot_of_files()
    assert {p for p in after if not p.endswith(".lock")} == \
        {p for p in before if not p.endswith(".lock")}
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == ["s1"]


def test_interrupted_operation_then_recover(world):
    vm = world.add_vm()
    vm.start()
    # the plugin dies mid-operation (SIGKILL): xapi would report a signal; stdout is empty
    call_env = {"LIVESNAP_FAULT": "create:after:0"}
    p = subprocess.run([PLUGIN, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid,
                                                                      "name": "s1"}),
                                                    methodname="snapshot_create")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, env=world.env(**call_env), timeout=60)
    assert p.returncode == -9 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    desc = world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s2"},
                      "LIVESNAP_INTERRUPTED")
    assert "recover" in desc[1]
    world.fail("snapshot_delete", {"vm_uuid": vm.uuid, "name": "s1"}, "LIVESNAP_INTERRUPTED")
    r = world.ok("recover", vm_uuid=vm.uuid)
    assert r["recovered"] is not None and r["op"] == "create"
    assert [s["name"] for s in world.ok("snapshot_list", vm_uuid=vm.uuid)["snapshots"]] == ["s1"]
    world.ok("snapshot_delete", vm_uuid=vm.uuid, name="s1")
    vm.stop()


def test_bad_image_datapath_and_internal(world):
    vm = world.add_vm()
    with open(vm.paths["xvdb"], "r+b") as f:           # the footer copy at the start too
        f.write(b"\0" * 512)
        f.seek(-512, 2)
        f.write(b"\0" * 512)
    desc = world.fail("snapshot_create", {"vm_uuid": vm.uuid, "name": "s1"},
                      "LIVESNAP_BAD_IMAGE")
    assert vm.paths["xvdb"] in desc[1]
    vm2 = world.add_vm("vm2")
    # XAPI says Running, tap-ctl cannot list: nothing may touch the disks
    world.xapi.record("VM", vm2.ref)["power_state"] = "Running"
    world.fail("snapshot_create", {"vm_uuid": vm2.uuid, "name": "s1"}, "LIVESNAP_DATAPATH_ERROR",
               TAP_CTL="/bin/false")
    desc = world.fail("snapshot_create", {"vm_uuid": vm2.uuid, "name": "s1"},
                      "LIVESNAP_DATAPATH_ERROR")
    assert "no tapdisk" in desc[1]
    world.xapi.record("VM", vm2.ref)["power_state"] = "Halted"
    state_file = os.path.join(world.base, "not-a-dir")
    open(state_file, "w").close()
    # (an internal error before: a FileExistsError from makedirs)
    desc = world.fail("snapshot_list", {"vm_uuid": vm2.uuid}, "LIVESNAP_CATALOG_ERROR",
                      LIVESNAP_STATE_DIR=state_file)
    assert desc[1] == "state directory %s is unusable: not a directory" % state_file
    assert json.loads(desc[2])["error"] == "StateDirUnusable"


def test_xapi_side_failures(world):
    vm = world.add_vm()
    tmpl = world.xapi.add_vm("tmpl", is_a_template=True)
    dom0 = world.xapi.add_vm("Control domain", is_control_domain=True, power_state="Running")
    snap = world.xapi.add_vm("vm1 snap", is_a_snapshot=True)
    for ref, word in ((tmpl, "template"), (dom0, "control domain"), (snap, "snapshot")):
        u = world.xapi.record("VM", ref)["uuid"]
        desc = world.fail("snapshot_create", {"vm_uuid": u, "name": "s1"},
                          "LIVESNAP_INVALID_ARGUMENT")
        assert word in desc[1]
    # a session xapi does not know: the first XenAPI call fails
    reply = world.run_plugin("snapshot_list", {"vm_uuid": vm.uuid},
                             session="OpaqueRef:%s" % uuid.uuid4())
    assert reply["Status"] == "Failure" and reply["ErrorDescription"][0] == "LIVESNAP_XAPI_ERROR"
    reply = world.run_plugin("snapshot_destroy_all", {"vm_uuid": vm.uuid})
    assert reply == {"Status": "Failure",
                     "ErrorDescription": ["UNKNOWN_XENAPI_PLUGIN_FUNCTION",
                                          "snapshot_destroy_all"]}


def test_every_livesnap_error_has_its_code():
    plugin = load_plugin()
    cases = {
        errors.UsageError(reason="x"): "INVALID_ARGUMENT",
        errors.DomainNotFound("vm"): "VM_NOT_FOUND",
        errors.SnapshotNotFound("vm", "s"): "SNAPSHOT_NOT_FOUND",
        errors.DuplicateName("vm", "s"): "DUPLICATE_NAME",
        errors.Busy("vm", "/l"): "BUSY",
        errors.WrongState("vm", "running", "r"): "WRONG_STATE",
        errors.InterruptedOperation("vm", 1, "create"): "INTERRUPTED",
        Interrupted(15, "vm"): "INTERRUPTED",
        errors.BadImage("/p", "r"): "BAD_IMAGE",
        errors.ChainTooDeep("/p", 31, 30): "BAD_IMAGE",
        errors.PathOutsideStorage("/p", "/s"): "BAD_IMAGE",
        errors.NoSpace("/d", 10, 1): "NO_SPACE",
        errors.UnusablePath("/p", "r"): "UNUSABLE_PATH",
        errors.DatapathError(reason="r"): "DATAPATH_ERROR",
        PauseTimeout("pause", 1, 2, "/p", "r"): "DATAPATH_ERROR",
        errors.CommandFailed(["x"], 1, "", "e"): "COMMAND_FAILED",
        errors.InvalidOutput(["x"], "o", "r"): "COMMAND_FAILED",
        errors.CatalogError("/c", "r"): "CATALOG_ERROR",
        XapiError("VM.get_record", ["HANDLE_INVALID"]): "XAPI_ERROR",
        errors.Error(): "INTERNAL",
        ValueError("x"): "INTERNAL",
    }
    for exc, code in cases.items():
        assert plugin.failure_code(exc) == code, exc
        details = json.loads(plugin._details(exc))
        assert details["error"] == type(exc).__name__
    # every class livesnap.errors defines maps to a specific code
    for name in dir(errors):
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.Error) and cls is not errors.Error:
            assert any(c.__name__ in plugin.CODES for c in cls.__mro__), name
