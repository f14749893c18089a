"""The architecture's contracts (.importlinter, docs/architecture.md): they hold on the tree,
and each one fails on a copy of the tree given an import that breaks it."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def _lint(root):
    return subprocess.run([LINT, "--no-logo", "--no-cache"], cwd=root, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def test_contracts_hold():
    p = _lint(ROOT)
    assert p.returncode == 0, p.stdout
    assert "0 broken" in p.stdout


# (file, what is written into it, the broken contract's name as lint-imports prints it):
# a new module; "+" appends to an existing one; "@path:line" also appends line to path
BREAKS = [
    ("livesnap/model/io_.py", "import sqlite3\n", "model is pure"),
    ("livesnap/model/io_.py", "from livesnap.tools import runner\n", "model is pure"),
    ("livesnap/vhd/up.py", "from livesnap.engine import names\n", "vhd (the VHD engine)"),
    ("livesnap/vhd/up.py", "import libvirt\n", "vhd (the VHD engine)"),
    ("livesnap/datapaths/up.py", "from livesnap.engine import engine\n", "layers"),
    ("livesnap/platforms/side.py", "from livesnap.datapaths import offline\n", "layers"),
    ("livesnap/lock_.py", "import livesnap.catalog\n", "layers"),    # in no layer
    ("livesnap/cli/svc.py", "from livesnap import service\n", "layers"),
    ("livesnap/engine/virt.py", "import libvirt\n", "libvirt is imported only"),
    ("livesnap/platforms/xml_.py", "import lxml.etree\n", "lxml is imported only"),
    ("livesnap/platforms/xen_session.py", "import XenAPI\n", "XenAPI is imported only"),
    ("livesnap/hook.py", "+from livesnap import errors\n", "hook is a stand-alone program"),
    # a circle inside a package: tools.runner -> tools.x -> tools.runner
    ("livesnap/tools/x.py", "from livesnap.tools import runner\n"
                            "@livesnap/tools/runner.py:from livesnap.tools import x\n",
     "no import circle"),
]


@pytest.mark.parametrize("path,source,contract", BREAKS,
                         ids=["%s:%s" % (b[0], b[1].strip().splitlines()[0]) for b in BREAKS])
def test_contract_catches(tmp_path, path, source, contract):
    for name in ("livesnap", ".importlinter"):
        src = os.path.join(ROOT, name)
        if os.path.isdir(src):
            shutil.copytree(src, str(tmp_path / name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, str(tmp_path / name))
    extra = [line for line in source.splitlines(True) if line.startswith("@")]
    source = "".join(line for line in source.splitlines(True) if not line.startswith("@"))
    target = tmp_path / path
    if source.startswith("+"):
        with open(str(target), "a") as f:
            f.write("\n" + source[1:])
    else:
        target.write_text(source)
    for line in extra:
        other, _, text = line[1:].partition(":")
        with open(str(tmp_path / other), "a") as f:
            f.write("\n" + text)
    p = _lint(str(tmp_path))
    assert p.returncode != 0, p.stdout
    broken = p.stdout[p.stdout.index("Broken contracts"):]
    assert contract in " ".join(broken.split()), p.stdout
