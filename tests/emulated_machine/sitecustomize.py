"""Makes this CPU machine look like another one to a CLI started with this folder on PYTHONPATH,
for refusals that must happen before any CUDA call (tests/test_precision.py):

    PROLONG_EMULATE=broken-cuda   a CUDA build of torch whose GPU does not initialise
    PROLONG_EMULATE=cuda          CUDA available (only config checks may run: no kernel exists)
"""
import os

machine = os.environ.get("PROLONG_EMULATE")
if machine in ("broken-cuda", "cuda"):
    import torch

    torch.version.cuda = "13.0"
    torch.backends.cuda.is_built = lambda: True
    torch.cuda.is_available = lambda: machine == "cuda"
