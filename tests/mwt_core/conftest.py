import pytest

from mwt_core.data.datasets import load_dataset


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def digits32():
    return load_dataset("digits", min_input_size=32)
