"""``python -m medrwr.cli``."""

import sys

from medrwr.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
