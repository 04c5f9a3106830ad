"""``python -m pvebackup``: the same as the ``pvebackup`` command."""

import sys

from pvebackup.cli.main import main

sys.exit(main())
