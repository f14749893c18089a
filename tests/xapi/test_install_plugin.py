"""``livesnap install-plugin``: the plugin copied atomically with mode 0755 and the livesnap
package path baked in, so that xapi's environment (no PYTHONPATH) finds livesnap."""
import argparse
import json
import os
import subprocess
import xmlrpc.client

from livesnap.cli import install_plugin
from livesnap.cli.main import common_options

from conftest_paths import PLUGIN, ROOT


def cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="livesnap")
    sub = parser.add_subparsers(dest="command")
    install_plugin.register(sub, common_options())
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_install_and_uninstall(world, capsys):
    plugins = os.path.join(world.base, "etc", "xapi.d", "plugins")
    out = json.loads(cli(["install-plugin", "--plugins-dir", plugins, "--output", "json"],
                         capsys))
    target = os.path.join(plugins, "livesnap")
    assert out["installed"] == target and out["livesnap_path"] == ROOT
    assert os.stat(target).st_mode & 0o7777 == 0o755 and os.listdir(plugins) == ["livesnap"]
    with open(target) as f, open(PLUGIN) as g:
        installed, source = f.read(), g.read()
    assert installed.startswith("#!/usr/bin/python3\n")
    assert "LIVESNAP_PATH = %r  # livesnap-install: LIVESNAP_PATH\n" % ROOT in installed
    assert len(installed.splitlines()) == len(source.splitlines())
    # reinstalling replaces it in place
    cli(["install-plugin", "--plugins-dir", plugins], capsys)
    assert os.listdir(plugins) == ["livesnap"]
    # run as xapi would: the installed file, livesnap found through the baked path only
    vm = world.add_vm()
    env = world.env(PYTHONPATH=os.pathsep.join(world.pythonpath.split(os.pathsep)[1:]))
    p = subprocess.run([target, xmlrpc.client.dumps((world.session, {"vm_uuid": vm.uuid}),
                                                    methodname="snapshot_list")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=env, cwd="/", timeout=60)
    (reply,), _ = xmlrpc.client.loads(p.stdout)
    assert reply["Status"] == "Success", (reply, p.stderr)
    assert json.loads(reply["Value"])["snapshots"] == []
    text = cli(["install-plugin", "--plugins-dir", plugins, "--uninstall"], capsys)
    assert text.strip() == "removed %s" % target and os.listdir(plugins) == []
    text = cli(["install-plugin", "--plugins-dir", plugins, "--uninstall"], capsys)
    assert "was not installed" in text
