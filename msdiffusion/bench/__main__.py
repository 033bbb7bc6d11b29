"""`python -m msdiffusion.bench ACTION ...` = `msdiff bench ACTION ...`, for launchers that take a module:

    accelerate launch --num_processes 8 -m msdiffusion.bench run ...
"""

import sys

from msdiffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
