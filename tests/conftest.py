import errno
import os
from pathlib import Path

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


@pytest.fixture
def unwritable_folder(tmp_path, monkeypatch):
    """A folder nothing can be created in: chmod 0o555, or, as root (who ignores modes), an os.open that refuses."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.name == "posix" and os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if Path(path).parent == folder and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    yield folder
