"""``python -m peft_asr``: the ``peft-asr`` command."""

import sys

from .cli import main

sys.exit(main())
