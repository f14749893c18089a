"""The ``livesnap`` program's entry point (the console script and ``python -m livesnap``).

``livesnap service`` starts the resident service (``livesnap.service``); every other
command goes to ``livesnap.cli.client``, which hands it to that service or runs it in this
process. Only this module knows both: the command line (``livesnap.cli``) never imports
the service. It runs first in every command, so it imports only what the client does
(built-in modules); the service is imported only to start it.
"""
import sys


def run():
    from livesnap import argv as order
    sys.argv[1:] = order.reorder(sys.argv[1:])      # virsh's order: global options first
    argv = sys.argv[1:]
    if argv[:1] == ["service"]:
        import os
        from livesnap import service
        os._exit(service.main(argv[1:]))
    from livesnap.cli import client
    client.run()
