"""``python -m meshllm.gateway ...``: the same as ``meshllm gateway ...``."""

import sys

from meshllm.gateway.cli import main

sys.exit(main())
