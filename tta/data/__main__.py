"""``python -m tta.data``: the ``tta-data`` command (see :mod:`tta.data.prepare`)."""

from .prepare import main

raise SystemExit(main())
