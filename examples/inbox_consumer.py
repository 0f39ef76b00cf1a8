"""A consumer with effectively-once effects: each order is invoiced once, even when the broker
delivers it twice or the handler fails after writing.

The inbox runs the handler in a database transaction that also records (group, message id) as
processed: the invoice and that record commit together, so a redelivery after a commit is acked
without running, and a failure rolls both back so the redelivery runs again.

Runs on the embedded memory:// broker and a SQLite file by default, and sends itself a few orders
(one of them twice, one whose first attempt fails after its write). Set MSGKIT_URL and
DATABASE_URL to use a real broker and database, e.g. with examples/outbox_service.py.

    pip install "msgkit[sql]"
    python examples/inbox_consumer.py
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile

from pydantic import BaseModel
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import msgkit
from msgkit.outbox import Inbox, create_schema, engine_from_url


class Base(DeclarativeBase):
    pass


class Invoice(Base):
    __tablename__ = "invoices"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]
    customer: Mapped[str] = mapped_column(String(100))
    amount: Mapped[int]


class OrderPlaced(BaseModel):
    order_id: int
    customer: str
    amount: int


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    db_url = os.environ.get("DATABASE_URL") or f"sqlite:///{tempfile.mkdtemp()}/billing.db"
    engine = engine_from_url(db_url)
    await create_schema(engine)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    inbox = Inbox(engine)
    handled: set[int] = set()  # orders whose handler returned (a commit follows)
    all_handled = asyncio.Event()

    async def invoice(event: OrderPlaced, delivery: msgkit.Delivery) -> None:
        session = inbox.session()  # the inbox's transaction: commit and rollback are its job
        session.add(Invoice(order_id=event.order_id, customer=event.customer, amount=event.amount))
        await session.flush()
        print(f"  invoicing order {event.order_id} (message {delivery.id}, attempt {delivery.attempt})")
        if event.order_id == 102 and delivery.attempt == 1:
            raise ConnectionError("the mail server is down")  # after the write: rolled back, retried
        handled.add(event.order_id)
        if {101, 102, 103} <= handled:
            all_handled.set()

    async with msgkit.Broker() as broker:  # MSGKIT_URL, else memory://
        await broker.declare("orders", "billing")
        orders = [OrderPlaced(order_id=n, customer="ada", amount=10 * n) for n in (101, 102, 103)]
        for order in orders:
            await broker.send("orders", order, key=order.customer, message_id=f"demo-order-{order.order_id}")
        await broker.send("orders", orders[0], message_id="demo-order-101")  # a duplicate delivery
        retry = msgkit.RetryPolicy(initial_delay=0.2)
        consumer = broker.consumer("orders", "billing", invoice, middleware=[inbox], retry=retry, ordered_by_key=True)
        await consumer.start()
        await asyncio.wait_for(all_handled.wait(), 30)
        await consumer.stop()  # graceful: lets the last commit finish and settles

    async with engine.connect() as conn:
        rows = await conn.execute(
            select(Invoice.order_id, func.count()).group_by(Invoice.order_id).order_by(Invoice.order_id)
        )
        for order_id, count in rows:
            print(f"order {order_id}: {count} invoice(s)")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
