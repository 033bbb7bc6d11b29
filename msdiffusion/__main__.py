"""`python -m msdiffusion` is the `msdiff` command."""

import sys

from msdiffusion.app.cli import main

sys.exit(main())
