"""``python -m gradhpo``: the ``gradhpo`` command (:func:`gradhpo.cli.main`), same exit codes."""

import sys

from gradhpo.cli import main

if __name__ == "__main__":
    sys.exit(main())
