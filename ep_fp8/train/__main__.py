"""`python -m ep_fp8.train --config FILE [--section.key=value ...]`."""

import os
import signal
import sys

from ep_fp8.train.main import INTERRUPTED, main

code = main()
sys.stdout.flush()
sys.stderr.flush()
if code == INTERRUPTED:
    # End by SIGINT itself, so that a shell script that started this run stops on the
    # Ctrl-C too (an exit status of 130 alone would not stop it).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
# FSDP2 over gloo can abort in interpreter teardown after a clean run (FACTS.md): leave
# without it, once the process group is gone and the output is flushed.
os._exit(code)
