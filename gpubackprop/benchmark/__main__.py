"""``python -m gpubackprop.benchmark``: the same as ``gpubackprop bench``."""

import sys

from gpubackprop.benchmark.runner import main

if __name__ == "__main__":
    sys.exit(main())
