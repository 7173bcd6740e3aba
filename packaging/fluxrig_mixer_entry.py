"""Entry point frozen into dist/fluxrig-mixer/fluxrig-mixer."""

import sys

from fluxrig_mixer.cli import main

if __name__ == "__main__":
    sys.exit(main())
