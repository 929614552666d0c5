"""`python -m pyramid_core generate|demo|decode|models`: see `pyramid_core.cli`."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
