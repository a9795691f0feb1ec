import pytest
from comfy_harness import boot_comfy, load_pack

boot_comfy()
load_pack()


@pytest.fixture(scope="session")
def pack():
    return load_pack()
