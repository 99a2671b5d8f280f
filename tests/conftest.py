import json
import pathlib

import pytest
import torch

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def reference():
    """Reference solutions from ../shared/problems (Bari IVP test set); skip when absent."""
    path = SHARED / "problems" / "reference.json"
    if not path.exists():
        pytest.skip(f"reference problems not found at {path}")
    return json.loads(path.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
