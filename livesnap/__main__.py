"""``python -m livesnap``: the ``livesnap`` program (through the livesnap service when one
listens, see ``livesnap.launcher`` and ``livesnap.cli.client``)."""
from livesnap.launcher import run

run()
