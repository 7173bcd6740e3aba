"""Entry point frozen into dist/fluxrig."""

import sys

from fluxrig.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
