"""Packaging: pyproject.toml (PEP 517/621) and setup.py (kept for setuptools < 61, a dom0's
Python 3.6, and for data_files) say the same; the wheel built from them holds every package,
the XAPI plugin and the hook launcher under share/livesnap, and the console script it installs
is pip's lean wrapper and runs."""
import ast
import glob
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _legacy_metadata():
    """setup.py's LEGACY_METADATA (what setuptools < 61 reads instead of pyproject.toml)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    (value,) = [n.value for n in tree.body if isinstance(n, ast.Assign)
                and [t.id for t in n.targets] == ["LEGACY_METADATA"]]
    return {kw.arg: ast.literal_eval(kw.value) for kw in value.keywords}


def test_pyproject_and_setup_py_agree():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    kw = _legacy_metadata()
    assert project["name"] == kw["name"]
    assert project["version"] == kw["version"]
    assert project["description"] == kw["description"]
    assert project["requires-python"] == kw["python_requires"]
    assert ["%s = %s" % item for item in project["scripts"].items()] == \
        kw["entry_points"]["console_scripts"]
    assert project.get("dependencies", []) == []          # the standard library only


def test_wheel_and_console_script(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), str(src))
    for name in ("livesnap", "xapi_plugin", "hooks"):
        shutil.copytree(os.path.join(ROOT, name), str(src / name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    # the test environment's setuptools: no download (a PEP 517 build all the same)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--disable-pip-version-check", "-w",
                        str(tmp_path / "dist"), str(src)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    (whl,) = glob.glob(str(tmp_path / "dist" / "livesnap-*.whl"))
    names = set(zipfile.ZipFile(whl).namelist())
    packages = {os.path.relpath(d, ROOT).replace(os.sep, "/")
                for d, _, files in os.walk(os.path.join(ROOT, "livesnap"))
                if "__init__.py" in files}
    for pkg in packages:
        assert pkg + "/__init__.py" in names, pkg
    for mod in glob.glob(os.path.join(ROOT, "livesnap", "**", "*.py"), recursive=True):
        assert os.path.relpath(mod, ROOT).replace(os.sep, "/") in names, mod
    data = "livesnap-0.1.0.data/data/share/livesnap/"
    assert data + "xapi_plugin/livesnap" in names
    assert data + "hooks/qemu.d/livesnap" in names
    assert not any(n.startswith(("tests/", "testxen/", "bench/")) for n in names)

    prefix = tmp_path / "prefix"
    # --ignore-installed: pip must not uninstall the livesnap of the running environment
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--ignore-installed", "--disable-pip-version-check", "--prefix",
                        str(prefix), whl],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    script = prefix / "bin" / "livesnap"
    text = script.read_text()
    assert "from livesnap.launcher import run" in text
    assert "pkg_resources" not in text and "EASY-INSTALL" not in text
    assert (prefix / "share" / "livesnap" / "xapi_plugin" / "livesnap").is_file()
    (site,) = glob.glob(str(prefix / "lib" / "python3*" / "site-packages"))
    env = dict(os.environ, PYTHONPATH=site, LIVESNAP_SERVICE="off")
    p = subprocess.run([str(script), "--version"], cwd=str(tmp_path), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "livesnap 0.1.0", p.stdout
    # the installed copy ran, not the checkout
    p = subprocess.run([sys.executable, "-c", "import livesnap; print(livesnap.__file__)"],
                       cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, text=True)
    assert p.stdout.startswith(site), p.stdout


def test_editable_install_lean_wrapper(tmp_path):
    """``pip install -e .`` as scripts/setup.sh runs it (PEP 660, editable_mode=compat): the
    console script is the lean wrapper (not setuptools' legacy develop wrapper) and runs the
    checkout's code."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), str(src))
    for name in ("livesnap", "xapi_plugin", "hooks"):
        shutil.copytree(os.path.join(ROOT, name), str(src / name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    prefix = tmp_path / "prefix"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--ignore-installed",
                        "--disable-pip-version-check", "--prefix", str(prefix),
                        "--config-settings", "editable_mode=compat", "-e", str(src)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.returncode == 0, p.stdout
    script = prefix / "bin" / "livesnap"
    text = script.read_text()
    assert "from livesnap.launcher import run" in text
    assert "pkg_resources" not in text and "EASY-INSTALL" not in text
    (site,) = glob.glob(str(prefix / "lib" / "python3*" / "site-packages"))
    (pth,) = glob.glob(os.path.join(site, "__editable__*livesnap*.pth"))
    assert open(pth).read().strip() == str(src)
    # site.addsitedir reads the .pth as an installed venv's site-packages would (-S: not the
    # running environment's, which has a livesnap of its own)
    code = "import site, sys; site.addsitedir(sys.argv[1]); import livesnap; print(livesnap.__file__)"
    p = subprocess.run([sys.executable, "-S", "-c", code, site], cwd=str(tmp_path),
                       stdout=subprocess.PIPE, text=True)
    assert p.stdout.strip() == str(src / "livesnap" / "__init__.py"), p.stdout
