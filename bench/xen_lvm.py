"""bench/xen.py --storage lvm: the run's volume group of the LVM stand-in (testxen/lvm), made
and torn down, every LVM command logged through a wrapper (start, end, verb), what one command
costs, and what LVM reports."""
import os
import shutil
import statistics
import subprocess
import sys
import time

from harness import ROOT
from livesnap.tools import lvm
from testxen import lvm as txlvm

LVM_STANDIN = os.path.join(ROOT, "testxen", "lvm")

LVM_WRAPPER = """%(shebang)s
# bench/xen.py: the LVM stand-in (testxen/lvm), each command's monotonic start, end, verb logged
import os, sys, time
t0 = time.monotonic_ns()
sys.path.insert(0, %(root)r)
from testxen.lvm import main
rc = 1
try:
    rc = main(sys.argv)
finally:
    fd = os.open(%(log)r, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, ("%%d %%d %%s %%s\\n" %% (t0, time.monotonic_ns(),
                                         sys.argv[1] if len(sys.argv) > 1 else "-", rc)).encode())
    os.close(fd)
sys.exit(rc)
"""


def lvm_log():
    """[(start ns, end ns, verb)] of every LVM command run so far (start: after the
    interpreter started)."""
    out = []
    try:
        with open(os.environ["LSBX_LVM_LOG"]) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 4:
                    out.append((int(parts[0]), int(parts[1]), parts[2]))
    except (KeyError, OSError):
        pass
    return out


def vg_report():
    """{LV name: (size in bytes, lv_attr)} of the run's VG, as LVM reports it."""
    return {lv["lv_name"]: (int(lv["lv_size"]), lv["lv_attr"])
            for lv in txlvm.Vg(os.environ["TESTXEN_LVM_ROOT"]).report()}


def setup_vg(run_dir, root, vg, size):
    """The run's VG, livesnap pointed at it through the logging wrapper."""
    with open(LVM_STANDIN) as f:
        shebang = f.readline().strip()
    wrapper = os.path.join(run_dir, "lvm")
    log = os.path.join(run_dir, "lvm.log")
    with open(wrapper, "w") as f:
        f.write(LVM_WRAPPER % {"shebang": shebang, "root": ROOT, "log": log})
    os.chmod(wrapper, 0o755)
    os.environ.update({"TESTXEN_LVM_ROOT": root, "LVM": wrapper, "LSBX_LVM_LOG": log})
    # LVM configured as in dom0 (writes only with SM's master configuration), SM's refcount
    # files in the run's directory (tests/conftest.py lvm_vg does the same)
    default, master = txlvm.dom0_conf(os.path.join(run_dir, "etc-lvm"))
    os.environ.update({"LVM_SYSTEM_DIR": default, "LIVESNAP_LVM_MASTER_DIR": master,
                       "LIVESNAP_SM_REFCOUNT_DIR": os.path.join(run_dir, "refcount")})
    txlvm.make_vg(root, vg, size)


def probe_lvm(vg, n=3):
    """What one stand-in command costs, from the caller: lvchange -p (changes metadata, so the
    stand-in then syncs its loop devices) and lvs (read-only), median of ``n`` runs each."""
    lv = "lsbx-probe"
    lvm.lvcreate(vg, lv, lvm.EXTENT)
    try:
        change, report = [], []
        for _ in range(n):
            for ro in (True, False):
                t = time.monotonic()
                lvm.set_readonly(vg, lv, ro)
                change.append((time.monotonic() - t) * 1000.0)
            t = time.monotonic()
            lvm.lv_size(vg, lv)
            report.append((time.monotonic() - t) * 1000.0)
    finally:
        lvm.lvremove(vg, lv)
    return {"lvchange_ms": round(statistics.median(change), 1),
            "lvs_ms": round(statistics.median(report), 1), "n": n}


def teardown_vg(root, vg):
    """The VG, its LVs' loop devices and links, its PV and loop device, the stand-in's root;
    then whatever an interrupted stand-in command may have left (a loop device over a file of
    ``root``, a link in /dev/<vg>)."""
    try:
        if os.path.exists(os.path.join(root, "vg.json")):
            txlvm.destroy_vg(root)
    except Exception as e:
        print("# warning: destroying %s: %s" % (vg, e), file=sys.stderr)
    p = subprocess.run(["losetup", "-a"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       universal_newlines=True)
    for line in p.stdout.splitlines():
        dev, _, rest = line.partition(":")
        if "(%s/" % root in rest:
            subprocess.run(["losetup", "-d", dev], stderr=subprocess.DEVNULL)
    d = os.path.join("/dev", vg)
    if os.path.isdir(d) and not os.path.islink(d):
        for f in os.listdir(d):
            if os.path.islink(os.path.join(d, f)):
                os.unlink(os.path.join(d, f))
        try:
            os.rmdir(d)
        except OSError as e:
            print("# warning: %s left: %s" % (d, e), file=sys.stderr)
    shutil.rmtree(root, ignore_errors=True)
