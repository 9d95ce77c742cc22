"""``python -m util.sweep``: runs :func:`util.sweep.cli.main`.

The command line lives in :mod:`util.sweep.cli`: a package that imported its own
``__main__`` (to export ``main``) would make ``python -m`` warn about running it twice.
"""

import sys

from util.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
