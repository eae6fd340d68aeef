"""``python -m relay_trio`` is the ``relay-trio`` command."""

from .cli import main

main()
