import os
import pathlib

import pytest

# Tests never reach the network: every model is built from a config inside the test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def shared_dir() -> pathlib.Path:
    """`../shared` beside the checkout; tests that need it skip cleanly without it."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (fresh clone): this test needs the shared specs/configs")
    return SHARED
