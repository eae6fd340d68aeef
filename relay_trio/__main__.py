"""``python -m relay_trio`` is the ``relay-trio`` command."""

from ._cli import main

main()
