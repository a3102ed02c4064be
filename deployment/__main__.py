"""``python -m deployment``: the publisher CLI (also installed as ``edgeml``)."""

from deployment.cli import main

if __name__ == "__main__":
    main()
