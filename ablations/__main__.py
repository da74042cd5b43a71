"""``python -m ablations`` is the ``ablate`` command."""

from ablations.cli import main

raise SystemExit(main())
