import json
import pathlib

import pytest
import torch

# Published reference solutions (Bari IVP test set), transcribed from ../shared/problems/reference.json
# into the repository so that a clone anywhere runs the accuracy tests (test_reference_copy checks
# the copy against the shared original where that exists).
REFERENCE = pathlib.Path(__file__).resolve().parent / "data" / "reference.json"
SHARED_REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "problems" / "reference.json"


@pytest.fixture(scope="session")
def reference():
    return json.loads(REFERENCE.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
