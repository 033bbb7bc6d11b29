"""`python -m msdiffusion` is the `msdiff` command."""

import sys

from msdiffusion.cli import main

sys.exit(main())
