"""``python -m bench`` from the repository root: the full benchmark, results into bench/results/.

Extra arguments go to ``gpubackprop bench`` (see ``python -m bench --help``); without ``--out``
the files are written as bench/results/<machine-type>.json, .md and .png (a run of some sections
only, e.g. ``python -m bench --sections vgg``, as <machine-type>-vgg.json and .md).
"""

import os
import sys

from gpubackprop.benchmark import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv += ["--out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")]
    sys.exit(main(argv))
