"""run_cpt under torchrun where only rank 0 receives the preemption signal (SIGTERM, as SLURM sends it, at step 2).

Usage: torchrun --nproc_per_node 2 tests/distributed/preempt_worker.py ARGV... (run_cpt's flags)
"""

import os
import signal
import sys

from transformers import TrainerCallback

from prolong.runtime import exit_without_teardown
from prolong.run_cpt import main


class SignalRankZero(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if int(os.environ["RANK"]) == 0 and state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main(sys.argv[1:], callbacks=[SignalRankZero()])
    exit_without_teardown()
