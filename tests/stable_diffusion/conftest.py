import pytest
from mlcweb_stable_diffusion.models import Networks, load_networks


@pytest.fixture(scope="session")
def nets() -> Networks:
    return load_networks("tiny", None, 0)
