"""``python -m sparsekern_cl``: see :mod:`sparsekern_cl.cli`."""

import sys

from .cli import main

sys.exit(main())
