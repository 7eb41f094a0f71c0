"""``python -m service.train``: the same entry point as ``python -m service`` (kept for scripts and
the Docker image that use this name)."""
import sys

if __name__ == "__main__":
    from service.signals import catch_early

    catch_early()  # before the imports' seconds: a stop then is honoured, not the signal's default death
from service.app import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
