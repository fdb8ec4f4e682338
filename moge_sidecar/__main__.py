"""`python -m moge_sidecar`: see moge_sidecar/server.py for the protocol."""

import sys

from moge_sidecar.server import main

if __name__ == "__main__":
    sys.exit(main())
