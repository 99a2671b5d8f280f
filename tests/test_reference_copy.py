"""The repository's copy of the reference solutions matches ../shared/problems where that exists."""
import json

import pytest

from tests.conftest import REFERENCE, SHARED_REFERENCE


def test_reference_copy_matches_the_shared_original():
    if not SHARED_REFERENCE.exists():
        pytest.skip(f"no shared original at {SHARED_REFERENCE} to compare with (the copy is used either way)")
    assert json.loads(REFERENCE.read_text()) == json.loads(SHARED_REFERENCE.read_text())
