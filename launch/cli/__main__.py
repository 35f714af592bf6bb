"""``python -m launch.cli``: the ``llorch`` command of this checkout."""

import sys

from launch.cli import main

sys.exit(main())
