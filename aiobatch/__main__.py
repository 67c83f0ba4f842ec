"""``python -m aiobatch``: the same as the ``aiobatch`` command."""

import sys

from .cli import main

sys.exit(main())
