import sys

from meshllm.cli import main

sys.exit(main())
