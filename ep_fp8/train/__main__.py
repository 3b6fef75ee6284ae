"""`python -m ep_fp8.train --config FILE [--section.key=value ...]`."""

import os
import sys

from ep_fp8.train.main import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# FSDP2 over gloo can abort in interpreter teardown after a clean run (FACTS.md): leave
# without it, once the process group is gone and the output is flushed.
os._exit(code)
