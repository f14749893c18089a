# pyproject.toml holds the metadata (PEP 621) and the build system (PEP 517): pip builds from
# it, and `pip install -e .` gets the lean console script. This file adds what pyproject does
# not state (the package list, data_files) and, for setuptools older than 61 (a dom0's Python
# 3.6), which reads only setup.py, the same metadata. tests/test_packaging.py checks that the
# two agree.
import setuptools
from setuptools import find_packages, setup

LEGACY_METADATA = dict(
    name="livesnap",
    version="0.1.0",
    description="Online VM disk snapshots and child-aware deletion for Xen (VHD) and KVM (qcow2)",
    python_requires=">=3.6",
    entry_points={"console_scripts": ["livesnap = livesnap.launcher:run"]},
)
# setuptools >= 61 takes these from pyproject.toml and warns about (later: refuses) a second copy
PEP621 = int(setuptools.__version__.split(".")[0]) >= 61

setup(
    packages=find_packages(include=["livesnap", "livesnap.*"]),
    # the XAPI plugin and the hook launcher, for `livesnap install-plugin` / packagers
    data_files=[("share/livesnap/xapi_plugin", ["xapi_plugin/livesnap"]),
                ("share/livesnap/hooks/qemu.d", ["hooks/qemu.d/livesnap"])],
    **({} if PEP621 else LEGACY_METADATA)
)
