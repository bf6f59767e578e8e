import pytest


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One embedded synthetic dataset per test module, generated on first use."""
    return str(tmp_path_factory.mktemp("cache"))
