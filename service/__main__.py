"""``python -m service``: the training service (see ``service.app``)."""
import sys

from service.app import main

sys.exit(main(sys.argv[1:]))
