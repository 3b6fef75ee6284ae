"""`python -m ep_fp8.train --config FILE [--section.key=value ...]`."""

import os
import signal
import sys

from ep_fp8.train.loop import end_by_signal
from ep_fp8.train.main import INTERRUPTED, main

code = main()
sys.stdout.flush()
sys.stderr.flush()
if code == INTERRUPTED:
    # A shell script that started this run stops on the Ctrl-C too only when the run ends
    # by SIGINT itself (an exit status of 130 alone would not stop it).
    end_by_signal(signal.SIGINT)
# FSDP2 over gloo can abort in interpreter teardown after a clean run (FACTS.md): leave
# without it, once the process group is gone and the output is flushed.
os._exit(code)
