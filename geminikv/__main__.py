"""``python -m geminikv``."""

import sys

from geminikv.cli import main

sys.exit(main())
