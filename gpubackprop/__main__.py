"""``python -m gpubackprop ...``: the same as the ``gpubackprop`` command."""

import sys

from gpubackprop.cli import main

if __name__ == "__main__":
    sys.exit(main())
