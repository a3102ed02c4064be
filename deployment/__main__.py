"""``python -m deployment``: the publisher CLI (also installed as ``edgeml``)."""

import sys

from deployment.cli import main

if __name__ == "__main__":
    sys.exit(main())
