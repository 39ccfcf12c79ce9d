"""``python -m steerlab``: the ``steerlab`` command."""

import sys

from steerlab.cli import main

if __name__ == "__main__":  # importing the module (documentation tools walk every module) runs nothing
    sys.exit(main())
