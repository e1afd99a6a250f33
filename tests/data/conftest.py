"""Fixtures of the dataset tests."""

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog


@pytest.fixture
def registered():
    """A list the test appends the dataset names it registers to; they are removed from
    detectron2's catalogs after the test."""
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
