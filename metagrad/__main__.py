"""``python -m metagrad``: the ``metagrad`` command line (:func:`metagrad.cli.main`)."""

import sys

from metagrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
