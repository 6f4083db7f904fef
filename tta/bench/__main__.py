"""``python -m tta.bench``: the same as the ``tta-bench`` command."""

from .app import main

main()
