"""Fixtures for the hook tests."""
import os

import pytest


@pytest.fixture
def install_hook(tmp_path):
    """Install the hook with ``livesnap install-hooks`` into a private hooks directory, with
    the state directory of a domain baked in; returns the installed file's path."""
    def install(dom):
        hooks = str(tmp_path / "hooks")
        proc = dom.cli("install-hooks", "--hooks-dir", hooks, "--state-dir", dom.state_dir)
        path = os.path.join(hooks, "qemu.d", "livesnap")
        assert path in proc.stdout
        return path
    return install
