"""``python -m quietstar``: the command line (``quietstar.train.cli``)."""

import sys

from quietstar.train.cli import main

sys.exit(main())
