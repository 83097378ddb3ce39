"""Tests for mask folders' value maps as given on the command line."""

from __future__ import annotations

import pytest

from segflow.data.mask_folders import parse_value_map
from segflow.errors import SegflowError


def test_parse_value_map_reads_pairs():
    assert parse_value_map("0:1, 255:0") == {0: 1, 255: 0}


@pytest.mark.parametrize("text", ["", "0:1,", "0-1", "0:256", "a:1", "1:2:3", "0:1,0:2", "-1:0", "²:1"])
def test_parse_value_map_rejects_bad_text(text):
    with pytest.raises(SegflowError, match="Value map"):
        parse_value_map(text)
