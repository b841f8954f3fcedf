"""Application code inside an item: a scoped_session registry, Flask-SQLAlchemy,
and commits that domain code makes, end to end on real databases."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import execute, query

MYAPP_DB = """
from sqlalchemy.orm import scoped_session, sessionmaker

Session = scoped_session(sessionmaker())
"""

MYAPP_SERVICES = """
import threading
from sqlalchemy import text
from myapp.db import Session

def place_order(item, *, commit):
    session = Session()
    session.execute(
        text("INSERT INTO orders (item, session_id, thread) VALUES (:i, :s, :t)"),
        {"i": item, "s": id(session), "t": threading.get_ident()},
    )
    if commit:
        Session.commit()

def place_order_then_fail(item):
    place_order(item, commit=True)
    raise ValueError(f"order {item} was refused after its commit")
"""

ORDERS_JOB = """
\"\"\"Places orders through the application's services.\"\"\"
import pathlib
from sqlalchemy import text
from myapp.db import Session
from myapp import services

SCOPED_SESSION = Session

def setup(ctx, session):
    assert Session() is session, "setup: the registry is not the run's session"
    session.execute(text(
        "CREATE TABLE IF NOT EXISTS orders (item INTEGER NOT NULL, session_id BIGINT, thread BIGINT)"))

def items(ctx, session):
    assert Session() is session, "items: the registry is not the reader's session"
    return range(int(ctx.params.get("n", 100)))

def prepare(ctx, item):
    if Session.registry.has():  # between hooks it holds nothing of jobrunner's
        pathlib.Path("leaked").touch()
    return item

def process(ctx, session, item):
    assert Session() is session, "process: the registry is not the item's session"
    if item % 10 == 3:
        services.place_order_then_fail(item)
    else:
        services.place_order(item, commit=item % 2 == 0)
"""


@pytest.fixture
def myapp(tmp_path: Path, jobs_dir: Path) -> dict[str, str]:
    """The application package beside the jobs folder, and the env that finds it."""
    package = jobs_dir.parent / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "db.py").write_text(textwrap.dedent(MYAPP_DB))
    (package / "services.py").write_text(textwrap.dedent(MYAPP_SERVICES))
    return {}


def orders(url: str) -> list[tuple]:
    return query(url, "SELECT item, session_id, thread FROM orders ORDER BY item")


BAD = {i for i in range(100) if i % 10 == 3}


@pytest.mark.parametrize("batch", ["1", "25"])
def test_services_that_use_the_registry_and_commit_run_in_the_items_transaction(
    cli, write_job, myapp, db_url, tmp_path, batch
):
    write_job("orders", ORDERS_JOB)
    out = cli("run", "orders", "--database-url", db_url, "-w", "4", "-b", batch, "--json")
    assert out.returncode == 1, out.stderr
    summary = json.loads(out.stdout)
    assert (summary["succeeded"], summary["failed"]) == (90, 10), out.stderr
    assert all("refused after its commit" in f["error"] for f in summary["failures"])
    rows = orders(db_url)
    # Every good order once; nothing of a failed one, though its service committed.
    assert [item for item, _, _ in rows] == sorted(set(range(100)) - BAD)
    # One session per worker thread, never one session in two threads.
    by_thread: dict[int, set[int]] = {}
    for _, session_id, thread in rows:
        by_thread.setdefault(thread, set()).add(session_id)
    assert all(len(ids) == 1 for ids in by_thread.values()), by_thread
    assert len({next(iter(ids)) for ids in by_thread.values()}) == len(by_thread)
    assert not (tmp_path / "leaked").exists(), "the registry held jobrunner's session between hooks"


def test_a_dry_run_through_the_registry_changes_nothing_and_reports_the_services_writes(
    cli, write_job, myapp, db_url
):
    write_job("orders", ORDERS_JOB)
    assert cli("run", "orders", "--database-url", db_url, "--param", "n=0").returncode == 0
    out = cli("run", "orders", "--database-url", db_url, "--dry-run", "--json")
    assert out.returncode == 1, out.stderr
    assert orders(db_url) == []
    assert json.loads(out.stdout)["changes"]["orders"]["insert"] == 90


def test_an_application_registry_bound_to_another_database_is_refused(
    cli, write_job, myapp, sqlite_url, tmp_path
):
    write_job(
        "orders",
        ORDERS_JOB.replace(
            "SCOPED_SESSION = Session",
            "from sqlalchemy import create_engine\n"
            "Session.configure(bind=create_engine('sqlite:///elsewhere.db'))\n"
            "SCOPED_SESSION = Session",
        ),
    )
    out = cli("run", "orders", "--database-url", sqlite_url)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "elsewhere.db" in line and "same URL" in line


# -- Flask-SQLAlchemy ---------------------------------------------------------------------
SHOP = """
import os
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()

class Product(db.Model):
    __tablename__ = "products"
    id = db.Column(db.Integer, primary_key=True)
    price = db.Column(db.Integer, nullable=False)

def create_app():
    app = Flask("shop")
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["SHOP_DATABASE_URL"]
    if os.environ.get("SHOP_REPORTS_URL"):
        app.config["SQLALCHEMY_BINDS"] = {"reports": os.environ["SHOP_REPORTS_URL"]}
    db.init_app(app)
    return app

def reprice(product_id):
    product = Product.query.filter_by(id=product_id).one()
    product.price += 1
    db.session.commit()
    if product_id % 10 == 3:
        raise ValueError(f"product {product_id} cannot be repriced")
"""

REPRICE_JOB = """
\"\"\"Reprices every product through the Flask app's service.\"\"\"
from shop import Product, create_app, db, reprice

app = create_app()
SCOPED_SESSION = db.session
APP_CONTEXT = app.app_context

def items(ctx, session):
    assert db.session() is session
    return [p.id for p in db.session.execute(db.select(Product).order_by(Product.id)).scalars()]

def process(ctx, session, item):
    assert db.session() is session and db.session.get(Product, item).id == item
    reprice(item)
"""


@pytest.fixture
def shop(jobs_dir: Path, db_url: str) -> dict[str, str]:
    (jobs_dir.parent / "shop.py").write_text(textwrap.dedent(SHOP))
    execute(db_url, "CREATE TABLE products (id INTEGER PRIMARY KEY, price INTEGER NOT NULL)")
    for start in range(0, 60, 20):
        values = ", ".join(f"({i}, 100)" for i in range(start, start + 20))
        execute(db_url, f"INSERT INTO products VALUES {values}")
    return {"SHOP_DATABASE_URL": db_url}


def prices(url: str) -> dict[int, int]:
    return dict(query(url, "SELECT id, price FROM products"))


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
def test_a_flask_sqlalchemy_service_acts_on_the_items_transaction(cli, write_job, shop, db_url, dry):
    write_job("reprice", REPRICE_JOB)
    out = cli(
        "run", "reprice", "--database-url", db_url, "-w", "3", *(["--dry-run"] if dry else []), env=shop
    )
    assert out.returncode == 1, out.stderr
    expected = {i: 100 if dry or i % 10 == 3 else 101 for i in range(60)}
    assert prices(db_url) == expected, "an item was changed twice, or a failed one kept its commit"


def test_a_flask_app_with_several_binds_is_refused_in_one_line(cli, write_job, shop, db_url, tmp_path):
    write_job("reprice", REPRICE_JOB)
    env = {**shop, "SHOP_REPORTS_URL": f"sqlite:///{tmp_path / 'reports.db'}"}
    out = cli("run", "reprice", "--database-url", db_url, env=env)
    assert out.returncode == 2, out.stderr
    [line] = out.stderr.strip().splitlines()
    assert "several database binds (reports)" in line
    assert prices(db_url) == dict.fromkeys(range(60), 100)


def test_a_service_that_calls_remove_undoes_its_item_and_fails_it_alone(cli, write_job, myapp, db_url):
    """remove() closes the registry's session: the item's. Its work is undone,
    the item fails, and the registry never hands out a session of its own."""
    write_job(
        "orders",
        ORDERS_JOB.replace(
            "    if item % 10 == 3:",
            "    if item == 5:\n"
            "        services.place_order(item, commit=False)\n"
            "        Session.remove()\n"
            "        services.place_order(1000 + item, commit=True)\n"
            "        return\n"
            "    if item % 10 == 3:",
        ),
    )
    out = cli("run", "orders", "--database-url", db_url, "--param", "n=20", "--json")
    assert out.returncode == 1, out.stderr
    failures = {f["item"]: f["error"] for f in json.loads(out.stdout)["failures"]}
    assert "called session.close()" in failures["5"], failures
    assert [item for item, _, _ in orders(db_url)] == [i for i in range(20) if i not in {3, 5, 13}]
