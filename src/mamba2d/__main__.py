import sys

from mamba2d.cli import main

if __name__ == "__main__":
    sys.exit(main())
