"""The canary's routing rule (serve/versions.py): a share of route keys by a fixed hash, and the
--canary flag's parsing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from genforge.common.errors import ConfigError
from genforge.serve.versions import parse_canary, route_bucket


@pytest.mark.parametrize("share", [1.0, 10.0, 50.0, 90.0])
def test_a_share_of_keys_lands_under_the_share(share):
    keys = [f"user-{i}" for i in range(20000)]
    under = sum(route_bucket(k) < share for k in keys) / len(keys)
    assert abs(under - share / 100) < 0.01
    assert all(0 <= route_bucket(k) < 100 for k in keys[:100])


def test_a_key_always_lands_in_the_same_place_and_raising_the_share_only_adds_keys():
    keys = [f"k{i}" for i in range(2000)]
    assert [route_bucket(k) for k in keys] == [route_bucket(k) for k in keys]
    at_10 = {k for k in keys if route_bucket(k) < 10}
    at_30 = {k for k in keys if route_bucket(k) < 30}
    assert at_10 < at_30  # a canary grown from 10% to 30% keeps its first users
    # every replica agrees: sha256, not Python's hash(), which is salted per process
    code = "from genforge.serve.versions import route_bucket; print([route_bucket(f'k{i}') for i in range(50)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert other.strip() == str([route_bucket(k) for k in keys[:50]])


@pytest.mark.parametrize("text, expected", [("nano@4=10%", ("nano@4", 10.0)), ("nano@4=0", ("nano@4", 0.0)),
                                            ("nano@prod=100%", ("nano@prod", 100.0)), ("n@2=2.5%", ("n@2", 2.5))])
def test_canary_flags_that_parse(text, expected):
    assert parse_canary(text) == expected


@pytest.mark.parametrize("text, message", [("nano@4=101%", "between 0 and 100"), ("nano@4=-1", "between 0 and 100"),
                                           ("nano@4", "NAME@VERSION=SHARE%"), ("=10%", "NAME@VERSION=SHARE%"),
                                           ("nano@4=ten", "not a number"), ("nano@4=nan", "between 0 and 100")])
def test_canary_flags_that_do_not(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_canary(text)
