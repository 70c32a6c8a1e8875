"""``python -m sparsearch.cli``: the same as the ``sparsearch`` command."""

from sparsearch.cli import main

main()
