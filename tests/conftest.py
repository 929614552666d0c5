import pytest
import torch

from tests.reference import FIXTURES


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixtures_root():
    if not (FIXTURES / "cases.json").exists():
        raise FileNotFoundError(
            f"golden fixtures not found at {FIXTURES}; set PYRAMID_FLOW_FIXTURES to the shared fixtures folder"
        )
    return FIXTURES
