# pyproject.toml holds the same metadata (PEP 621) and the build system (PEP 517): pip builds
# from it, and `pip install -e .` gets the lean console script. This file keeps data_files, which
# pyproject cannot state, and serves setuptools older than 61 (a dom0's Python 3.6), which reads
# only setup.py. tests/test_packaging.py checks that the two agree.
from setuptools import find_packages, setup

setup(
    name="livesnap",
    version="0.1.0",
    description="Online VM disk snapshots and child-aware deletion for Xen (VHD) and KVM (qcow2)",
    packages=find_packages(include=["livesnap", "livesnap.*"]),
    python_requires=">=3.6",
    entry_points={"console_scripts": ["livesnap = livesnap.cli.client:run"]},
    # the XAPI plugin and the hook launcher, for `livesnap install-plugin` / packagers
    data_files=[("share/livesnap/xapi_plugin", ["xapi_plugin/livesnap"]),
                ("share/livesnap/hooks/qemu.d", ["hooks/qemu.d/livesnap"])],
)
