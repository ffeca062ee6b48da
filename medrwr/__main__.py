"""``python -m medrwr``: the ``medrwr`` command."""

import sys

from medrwr.cli import main

if __name__ == "__main__":  # importing this module (doctest collection, tools) must not run the CLI
    sys.exit(main())
