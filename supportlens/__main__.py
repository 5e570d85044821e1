"""``python -m supportlens``: the same as the ``supportlens`` command."""

from supportlens.cli import main

main()
