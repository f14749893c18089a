"""Each command's ``--help`` (issue 14: "each command's --help with a description and an
example"): a description, examples of that command which the parser takes as they are
written, and a help for every argument."""
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT
from livesnap import argv as order
from livesnap.cli import help_text, main

COMMANDS = sorted(help_text.TEXTS)


def test_every_command_but_the_service_and_vhd_has_its_texts():
    parser = main.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) - {"service", "vhd"} == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_a_description_examples_and_every_argument_explained(command):
    proc = subprocess.run([sys.executable, "-m", "livesnap", command, "--help"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    usage, rest = out.split("\n\n", 1)
    description = rest.split("positional arguments:")[0].split("options:")[0]
    assert len(description.split()) >= 10, out
    examples = out.split("examples:\n", 1)[1].strip().splitlines()
    assert [e for e in examples if e.split()[1:2] == [command] or command in e.split()], out
    parser = main.build_parser()
    for action in parser._subparsers._group_actions[0].choices[command]._actions:
        assert action.help, (command, action.dest)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_livesnap_example_parses_as_written(command):
    """An example the parser would refuse (a wrong option, a missing argument) fails."""
    for line in help_text.TEXTS[command][1]:
        words = shlex.split(line)
        if words[0] != "livesnap":
            continue
        argv = order.reorder(words[1:])
        with _no_exit():
            args = main.build_parser(argv).parse_args(argv)
        assert args.command == command, line


class _no_exit(object):
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is SystemExit:
            raise AssertionError("the parser refused the example (exit %s)" % value.code)
        return False
