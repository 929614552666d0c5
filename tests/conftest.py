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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A ComfyUI base folder for one test module: the tiny fixture models, an input image."""
    from tests.helpers import make_base

    return make_base(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture
def comfy(base):
    """The ComfyUI double active for one test (no progress hook, no updates recorded yet); yields
    `comfy.model_management`."""
    from tests import comfy_double

    comfy_double.install(base)
    import comfy.model_management as mm
    import comfy.utils as utils

    utils.UPDATES.clear()
    utils.set_progress_bar_global_hook(None)
    yield mm
    utils.set_progress_bar_global_hook(None)
    comfy_double.uninstall()
