"""``python -m fastaccum``: the same as the ``fastaccum`` console script."""

import sys

from fastaccum.cli import main

sys.exit(main())
