"""The DiMOO-format fixture folder, built once per test session (engine/dimoo/fixture.py)."""

import pytest


@pytest.fixture(scope="session")
def dimoo_dir(tmp_path_factory):
    from engine.dimoo.fixture import write_dimoo_format

    return write_dimoo_format(tmp_path_factory.mktemp("dimoo") / "lumina-dimoo-tiny", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models' matmuls are faster on one thread than on cores shared by other work (and a run must be
    exact whatever the thread count: both halves of each comparison run alike). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
