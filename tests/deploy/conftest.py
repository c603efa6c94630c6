import pytest

from tests.deploy.promql import INSTALL_HINT, promtool_path


@pytest.fixture(scope="session")
def promtool() -> str:
    path = promtool_path()
    if path is None:
        pytest.skip(INSTALL_HINT)
    return path
