import sys

from lmforge.cli import main

if __name__ == "__main__":  # not when a spawned child process (the serving engine) imports it
    sys.exit(main())
