"""Reprice every product from the median of its recent price observations.

Each item is one product id. Processing it reads the product and its latest
observations, and when the median differs from the current price, updates the
price and records the change in price_changes, in one transaction. A second
run changes nothing until new observations arrive: the job is safe to rerun.

On first use of an empty database, setup() creates and seeds the demo tables
(products, price_history, price_changes).

Parameters: --param window=N (observations considered, default 5),
--param limit=N (process at most N products).
"""

from __future__ import annotations

import itertools
import random
import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import ForeignKey, Numeric, String, func, insert, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import jobrunner

SEED_PRODUCTS = 2_000
OBSERVATIONS_PER_PRODUCT = 8


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(32), unique=True)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    repriced_at: Mapped[datetime | None]


class PriceObservation(Base):
    __tablename__ = "price_history"
    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    observed_at: Mapped[datetime]


class PriceChange(Base):
    __tablename__ = "price_changes"
    id: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"), index=True)
    old_price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    new_price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    changed_at: Mapped[datetime]


def setup(ctx, session):
    """Create and seed the demo tables when the database has none."""
    Base.metadata.create_all(session.connection(), checkfirst=True)
    if session.scalar(select(func.count()).select_from(Product)):
        return
    rng = random.Random(42)
    now = datetime.now(UTC).replace(tzinfo=None)
    products, observations = [], []
    for product_id in range(1, SEED_PRODUCTS + 1):
        base = Decimal(rng.randrange(100, 100_000)) / 100
        products.append({"id": product_id, "sku": f"SKU-{product_id:06d}", "price": base})
        for n in range(OBSERVATIONS_PER_PRODUCT):
            drift = Decimal(rng.randrange(-1500, 1500)) / 10000  # +-15%
            observations.append(
                {
                    "product_id": product_id,
                    "price": (base * (1 + drift)).quantize(Decimal("0.01")),
                    "observed_at": now - timedelta(hours=n),
                }
            )
    session.execute(insert(Product), products)
    session.execute(insert(PriceObservation), observations)
    ctx.log.info("seeded %d demo products", SEED_PRODUCTS)


def items(ctx, session):
    # Product ids only: ORM objects stay in the session that loaded them.
    # paged() reads 1,000 ids per short transaction, so a long run holds no
    # snapshot that would keep VACUUM from cleaning up after other writers.
    ids = jobrunner.paged(session, select(Product.id), key=Product.id, size=1000)
    return itertools.islice(ids, int(ctx.params["limit"])) if "limit" in ctx.params else ids


def count(ctx, session):
    total = session.scalar(select(func.count()).select_from(Product))
    return min(total, int(ctx.params["limit"])) if "limit" in ctx.params else total


def process(ctx, session, product_id):
    window = int(ctx.params.get("window", 5))
    product = session.get(Product, product_id)
    recent = session.scalars(
        select(PriceObservation.price)
        .where(PriceObservation.product_id == product_id)
        .order_by(PriceObservation.observed_at.desc())
        .limit(window)
    ).all()
    if product is None or not recent:
        return
    target = Decimal(statistics.median(recent)).quantize(Decimal("0.01"))
    if target == product.price:
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    session.add(PriceChange(product_id=product_id, old_price=product.price, new_price=target, changed_at=now))
    product.price = target
    product.repriced_at = now


def item_key(product_id):
    return str(product_id)
