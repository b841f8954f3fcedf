"""The async path's decisions that need no database."""

from __future__ import annotations

import pytest

from jobrunner import aio
from jobrunner.db import url_for
from jobrunner.exceptions import ConfigError


@pytest.mark.parametrize(
    ("url", "sync", "asynchronous"),
    [
        ("postgresql://u:p@h/d", "postgresql+psycopg2://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("postgresql+psycopg2://u:p@h/d", "postgresql+psycopg2://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("postgresql+asyncpg://u:p@h/d", "postgresql+psycopg2://u:p@h/d", "postgresql+asyncpg://u:p@h/d"),
        ("sqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite:///x.db", "sqlite+aiosqlite:///x.db"),
        ("mysql+pymysql://u:p@h/d", "mysql+pymysql://u:p@h/d", "mysql+aiomysql://u:p@h/d"),
        ("mysql+aiomysql://u:p@h/d", "mysql+pymysql://u:p@h/d", "mysql+aiomysql://u:p@h/d"),
        ("mariadb+pymysql://u:p@h/d", "mariadb+pymysql://u:p@h/d", "mariadb+aiomysql://u:p@h/d"),
    ],
)
def test_one_url_serves_both_kinds_of_job(url, sync, asynchronous):
    assert url_for(url, asynchronous=False) == sync
    assert url_for(url, asynchronous=True) == asynchronous


def test_a_missing_async_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setattr(aio, "_MISSING", "No module named 'greenlet'")
    with pytest.raises(ConfigError) as raised:
        aio.require("postgresql")
    message = str(raised.value)
    assert "pip install 'jobrunner[async]'" in message and "\n" not in message
    assert ConfigError.exit_code == 2


def test_server_options_become_asyncpg_server_settings():
    assert aio._server_settings("-c a=1 -c b=two") == {"a": "1", "b": "two"}
