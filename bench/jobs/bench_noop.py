"""Benchmark: a generator of no-op items (memory and per-item overhead)."""


def items(ctx, session):
    return iter(range(int(ctx.params.get("n", 100000))))


def process(ctx, session, item):
    pass
