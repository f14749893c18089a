"""The package (and the XAPI plugin) must run on Python 3.6, the dom0 Python of XCP-ng 8.3
and XenServer 8: vermin finds nothing newer."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_vermin_targets_36():
    trees = [t for t in ("livesnap", "xapi_plugin", "hooks") if os.path.isdir(os.path.join(ROOT, t))]
    files = []
    for t in trees:
        for dirpath, _, names in os.walk(os.path.join(ROOT, t)):
            for n in names:
                p = os.path.join(dirpath, n)
                if n.endswith(".py"):
                    files.append(p)
                elif "." not in n:
                    with open(p, "rb") as f:
                        first = f.readline()
                    if first.startswith(b"#!") and b"python" in first:
                        files.append(p)
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    proc = subprocess.run([vermin, "-t=3.6-", "--no-tips", "--violations", "--eval-annotations",
                           "--no-parse-comments"] + files,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout
    assert len(files) > 20


def test_stdlib_only_at_import():
    """Importing the package and its CLI pulls in neither libvirt nor lxml."""
    code = ("import sys, livesnap.cli.main, livesnap.engine.engine, livesnap.catalog;"
            "bad = [m for m in ('libvirt', 'lxml', 'tqdm') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stdout
