import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _data_env():
    """Tests read the real MNIST from ../shared/data unless KRONSPARSE_DATA says otherwise."""
    if "KRONSPARSE_DATA" not in os.environ and SHARED_DATA.is_dir():
        os.environ["KRONSPARSE_DATA"] = str(SHARED_DATA)
    yield
