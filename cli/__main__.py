"""``python -m setpoint``: the same as the ``setpoint`` command."""

import sys

from .cli import main

sys.exit(main())
