import pytest
import torch
from comfy_harness import boot_comfy, load_pack

# The in-process models are tiny: a second thread buys nothing, and on a busy machine OpenMP's spinning threads
# can slow them down tenfold. The e2e server runs in its own process with its own threads.
torch.set_num_threads(1)
boot_comfy()
load_pack()


@pytest.fixture(scope="session")
def pack():
    return load_pack()
