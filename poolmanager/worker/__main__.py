"""``python -m poolmanager.worker``: see ``poolmanager.worker.main``."""

import sys

from poolmanager.worker.main import main

sys.exit(main())
