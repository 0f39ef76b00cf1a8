"""A service that takes order requests, writes each order to its database and announces it through
the transactional outbox: the order row and the "order placed" message commit together or not at
all, and a relay publishes the message after the commit.

Runs on the embedded memory:// broker and a SQLite file by default. Set MSGKIT_URL (a broker) and
DATABASE_URL (e.g. postgresql://user:pass@host/db) to use real ones; then run
examples/inbox_consumer.py against the same broker to consume the orders in another process.

    pip install "msgkit[sql]"
    python examples/outbox_service.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

from pydantic import BaseModel, ValidationError
from sqlalchemy import String
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import msgkit
from msgkit.outbox import Outbox, OutboxRelay, create_schema, engine_from_url


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    amount: Mapped[int]


class PlaceOrder(BaseModel):
    """The request."""

    customer: str
    amount: int


class OrderPlaced(BaseModel):
    """The event the service publishes."""

    order_id: int
    customer: str
    amount: int


outbox = Outbox()


async def place_order(sessions: async_sessionmaker[AsyncSession], request: PlaceOrder) -> int:
    """Write the order and its event in one transaction. A failure anywhere leaves neither."""
    async with sessions() as session, session.begin():
        order = Order(customer=request.customer, amount=request.amount)
        session.add(order)
        await session.flush()  # assigns order.id
        if order.amount <= 0:
            raise ValueError("amount must be positive")  # rolls back the order and the message
        event = OrderPlaced(order_id=order.id, customer=order.customer, amount=order.amount)
        await outbox.add(session, "orders", event, key=order.customer)  # per-customer order
        return order.id


async def serve(sessions: async_sessionmaker[AsyncSession]) -> asyncio.Server:
    """A tiny line-protocol server: one JSON request per line in, one JSON reply per line out."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            reply: dict[str, int | str]
            try:
                reply = {"order_id": await place_order(sessions, PlaceOrder.model_validate_json(line))}
            except (ValidationError, ValueError) as exc:
                reply = {"error": str(exc).splitlines()[0]}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def main() -> None:
    db_url = os.environ.get("DATABASE_URL") or f"sqlite:///{tempfile.mkdtemp()}/orders.db"
    engine = engine_from_url(db_url)
    await create_schema(engine)  # msgkit's tables; or `msgkit outbox create-schema DB_URL`
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async with msgkit.Broker() as broker:  # MSGKIT_URL, else memory://
        await broker.declare("orders", "example-listener")
        published: list[OrderPlaced] = []
        all_published = asyncio.Event()

        async def listen(event: OrderPlaced) -> None:
            published.append(event)
            print(f"  published: order {event.order_id} for {event.customer} ({event.amount})")
            if len(published) == 3:
                all_published.set()

        listener = broker.consumer("orders", "example-listener", listen)
        await listener.start()
        # the relay runs in-process here; in production it can be `msgkit outbox relay DB_URL BROKER_URL`
        async with OutboxRelay(engine, broker):
            server = await serve(sessions)
            host, port = server.sockets[0].getsockname()[:2]
            reader, writer = await asyncio.open_connection(host, port)
            requests = [
                {"customer": "ada", "amount": 30},
                {"customer": "bob", "amount": 12},
                {"customer": "ada", "amount": -5},  # refused: no order, no message
                {"customer": "ada", "amount": 7},
            ]
            for request in requests:
                writer.write(json.dumps(request).encode() + b"\n")
                print(f"request {request} -> {json.loads(await reader.readline())}")
            writer.close()
            server.close()
            await server.wait_closed()
            await asyncio.wait_for(all_published.wait(), 10)
        await listener.stop()
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
