"""``python -m aiobatch``: the same as the ``aiobatch`` command."""

import sys

from ._cli import main

sys.exit(main())
