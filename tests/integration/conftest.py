import pytest
from comfy_harness import tiny_model


@pytest.fixture(scope="module", params=["sdxl", "sd15"])
def family(request):
    """Every test that takes it runs on both UNet families the pack supports."""
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return tiny_model(family)
