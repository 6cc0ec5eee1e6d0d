"""Process set-up and exit for the training entry scripts: logging levels, closing the process group,
leaving a gloo run without its teardown."""

from __future__ import annotations

import logging
import os
import sys

import torch
import transformers


def quiet_config_dumps() -> None:
    """transformers logs the whole config at INFO on every load (model, generation config, tokenizer):
    keep its warnings, drop the dumps, so the run's own log stays readable."""
    for name in ("transformers.configuration_utils", "transformers.generation.configuration_utils",
                 "transformers.modeling_utils", "transformers.tokenization_utils_base"):
        logging.getLogger(name).setLevel(logging.WARNING)


def setup_logging(args) -> None:
    level = logging.INFO if args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    transformers.utils.logging.set_verbosity(level)


def close_process_group(trainer) -> None:
    """Destroy the process group at the end of a completed NCCL run (torch asks for it). gloo
    groups are left to `exit_without_teardown`; a stopped (preempted) run keeps its group too."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo" and trainer.state.global_step >= trainer.state.max_steps:
        trainer.end()


def exit_without_teardown() -> None:
    """End a gloo (CPU) distributed process right away, once its outputs are written.

    gloo's worker threads can still hold finished work objects whose tensors need the GIL to be
    freed, while the group's destructor (at interpreter teardown, or when the DDP reducer drops the
    last reference after destroy_process_group) joins those threads holding the GIL: the process
    then aborts ("terminate called without an active exception") or hangs (pytorch/pytorch#190489,
    #179291). Seen in CI and under preemption tests. Leaving with os._exit skips that teardown.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "gloo":
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
