"""``python -m keel.cli``: the ``keel`` command."""

import sys

from keel.cli.main import main

sys.exit(main())
