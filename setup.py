from setuptools import find_packages, setup

setup(
    name="livesnap",
    version="0.1.0",
    description="Online VM disk snapshots and child-aware deletion for Xen (VHD) and KVM (qcow2)",
    packages=find_packages(include=["livesnap", "livesnap.*"]),
    python_requires=">=3.6",
    entry_points={"console_scripts": ["livesnap = livesnap.launcher:run"]},
    # the XAPI plugin and the hook launcher, for `livesnap install-plugin` / packagers
    data_files=[("share/livesnap/xapi_plugin", ["xapi_plugin/livesnap"]),
                ("share/livesnap/hooks/qemu.d", ["hooks/qemu.d/livesnap"])],
)
