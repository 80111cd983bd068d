"""``python -m kvbm_builder``: the same command line as ``kvbm-builder``."""

from .cli import main

raise SystemExit(main())
