"""``python -m service``: the training service (see ``service.app``)."""
import sys

from service.signals import catch_early

catch_early()  # before the imports' seconds: a stop then is honoured, not the signal's default death
from service.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
