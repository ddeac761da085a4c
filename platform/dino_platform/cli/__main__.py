"""``python -m dino_platform.cli``: the ``dino`` command without its console script."""
import sys

from dino_platform.cli import main

sys.exit(main())
