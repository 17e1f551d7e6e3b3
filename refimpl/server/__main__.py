"""``python -m refimpl.server`` is ``refimpl-server``."""

import sys

from .cli import main

sys.exit(main())
