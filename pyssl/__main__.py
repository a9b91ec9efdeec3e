"""``python -m pyssl ...`` is the ``pyssl`` command."""

import sys

from pyssl.cli import main

sys.exit(main())
