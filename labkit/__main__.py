"""`python -m labkit ...` is the `labkit` command (see labkit.cli)."""

from labkit.cli import main

raise SystemExit(main())
