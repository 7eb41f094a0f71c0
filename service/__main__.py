"""``python -m service``: the training service (see ``service.app``)."""
import faulthandler
import sys

from service.signals import catch_early

# A crash in native code (DALI's decoder, a CUDA library) printed nothing and exited 139: now the
# Python stack of every thread, the place it happened (service.unclean_end says what follows).
faulthandler.enable()
catch_early()  # before the imports' seconds: a stop then is honoured, not the signal's default death
from service.app import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
