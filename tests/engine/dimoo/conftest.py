"""The DiMOO-format fixture folder, built once per test session (engine/dimoo/fixture.py)."""

import pytest


@pytest.fixture(scope="session")
def dimoo_dir(tmp_path_factory):
    from engine.dimoo.fixture import write_dimoo_format

    return write_dimoo_format(tmp_path_factory.mktemp("dimoo") / "lumina-dimoo-tiny", seed=0)
