"""``python -m scgpt_vcc.cli``: the ``scgpt-vcc`` command where it is not installed."""

import sys

from scgpt_vcc.cli import main

sys.exit(main())
