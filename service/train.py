"""``python -m service.train``: the same entry point as ``python -m service`` (kept for scripts and
the Docker image that use this name)."""
import sys

from service.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
