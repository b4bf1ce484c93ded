"""``python -m meshllm.gateway ...``: the same as ``meshllm gateway ...``."""

import sys

from meshllm.cli.gateway import main

sys.exit(main())
