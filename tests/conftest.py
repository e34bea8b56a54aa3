import glob
import os

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. Triton
# reads TRITON_INTERPRET when it is first imported (torch may import it), so it is
# set here, before anything else, when no NVIDIA device is present.
if not glob.glob("/dev/nvidia[0-9]*"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible: torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
