"""Test tiers for pytest (markers registered in pyproject.toml).

- `distributed`: every test under tests/distributed/, which starts real ranks (gloo, torchrun or
  torch.multiprocessing) and compares them with the one-process run; marked here, by directory,
  so a new test there cannot be left out of the tier.
- `slow`: a single-process test that takes more than a few seconds on 2 cores; marked where it is
  defined.

The inner loop while editing is `pytest -m "not slow and not distributed"` (under a minute on
2 cores; see the README); CI runs everything.
"""

from pathlib import Path

import pytest

DISTRIBUTED = Path(__file__).resolve().parent / "tests" / "distributed"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DISTRIBUTED in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.distributed)
