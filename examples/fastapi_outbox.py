"""A FastAPI service that places orders through the transactional outbox.

``POST /orders`` writes the order row and its "order placed" message in one database transaction:
both commit or neither does. The outbox relay publishes committed messages to the broker, and a
consumer (here in the same process; in production another service) ships the orders.

    pip install "msgkit[examples]"
    python examples/fastapi_outbox.py        # drives the app in-process with httpx, then exits

or serve it with uvicorn (in the same extra) and POST to it yourself:

    uvicorn --app-dir examples fastapi_outbox:app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' -d '{"customer": "ada", "amount": 30}'

The database is DATABASE_URL, else MSGKIT_POSTGRES_URL, else a SQLite file in a temporary folder;
on PostgreSQL the example works in a schema of its own and drops it at exit, so it can share a
database. The broker is MSGKIT_URL, else memory://.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy import String, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import msgkit
from msgkit.outbox import Outbox, OutboxRelay, create_schema, engine_from_url

TOPIC = "orders-placed"
outbox = Outbox()


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    amount: Mapped[int]


class PlaceOrder(BaseModel):
    """The request body of ``POST /orders``."""

    customer: str = Field(min_length=1, max_length=100)
    amount: int


class OrderPlaced(BaseModel):
    """The event the service publishes for each order."""

    order_id: int
    customer: str
    amount: int


class Shipping:
    """The consumer side: ships each order it hears about."""

    def __init__(self) -> None:
        self.shipped: set[int] = set()
        self.changed = asyncio.Event()

    async def ship(self, event: OrderPlaced, delivery: msgkit.Delivery) -> None:
        print(f"  shipping order {event.order_id} for {event.customer} (message {delivery.id})")
        self.shipped.add(event.order_id)
        self.changed.set()

    async def wait_for(self, order_ids: set[int], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not order_ids <= self.shipped:
                self.changed.clear()
                await self.changed.wait()


def database_url() -> str:
    url = os.environ.get("DATABASE_URL") or os.environ.get("MSGKIT_POSTGRES_URL")
    return url or f"sqlite:///{tempfile.mkdtemp()}/orders.db"


@asynccontextmanager
async def database(url: str) -> AsyncIterator[AsyncEngine]:
    """An engine for ``url``; on PostgreSQL one that works in a fresh schema, dropped afterwards."""
    if make_url(url).get_backend_name() != "postgresql":
        engine = engine_from_url(url)
        try:
            yield engine
        finally:
            await engine.dispose()
        return
    schema = f"orders_example_{uuid.uuid4().hex[:8]}"
    admin = engine_from_url(url)
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = engine_from_url(url, connect_args={"server_settings": {"search_path": schema}})
    try:
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await admin.dispose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the database, broker, relay and consumer with the app; stop them gracefully with it."""
    db_url = database_url()
    async with database(db_url) as engine, msgkit.Broker() as broker:
        print(f"database {make_url(db_url).render_as_string(hide_password=True)}, broker {broker.url}")
        await create_schema(engine)  # msgkit's outbox tables (or `msgkit outbox create-schema`)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await broker.declare(TOPIC, "shipping")
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.shipping = shipping = Shipping()
        consumer = broker.consumer(TOPIC, "shipping", shipping.ship, max_in_flight=16)
        await consumer.start()
        async with OutboxRelay(engine, broker) as relay:  # or `msgkit outbox relay DB_URL BROKER_URL`
            app.state.relay = relay
            yield
        await consumer.stop()


app = FastAPI(title="orders", lifespan=lifespan)


def sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    factory: async_sessionmaker[AsyncSession] = request.app.state.sessions
    return factory


Sessions = Annotated[async_sessionmaker[AsyncSession], Depends(sessions)]


@app.post("/orders", status_code=201)
async def place_order(body: PlaceOrder, sessions: Sessions) -> OrderPlaced:
    """Write the order and its event in one transaction; an error anywhere leaves neither."""
    async with sessions() as session, session.begin():
        order = Order(customer=body.customer, amount=body.amount)
        session.add(order)
        await session.flush()  # assigns order.id
        if order.amount <= 0:
            raise HTTPException(422, "amount must be positive")  # rolls back the order and its message
        event = OrderPlaced(order_id=order.id, customer=order.customer, amount=order.amount)
        await outbox.add(session, TOPIC, event, key=order.customer)  # one customer's orders stay in order
    return event


@app.get("/outbox/pending")
async def outbox_pending(request: Request) -> dict[str, int]:
    """Outbox rows not published yet."""
    relay: OutboxRelay = request.app.state.relay
    return {"pending": await relay.pending()}


async def settled_outbox(client: httpx.AsyncClient, timeout: float = 10, every: float = 0.05) -> int:
    """Outbox rows still pending once the relay marked what it published as sent (it publishes
    first and marks after, so a consumer can see a message a moment before its row is marked)."""
    pending = -1
    for _ in range(round(timeout / every)):
        pending = int((await client.get("/outbox/pending")).json()["pending"])
        if not pending:
            break
        await asyncio.sleep(every)
    return pending


async def main() -> int:
    requests = [
        {"customer": "ada", "amount": 30},
        {"customer": "bob", "amount": 12},
        {"customer": "ada", "amount": -5},  # refused: no order row, no message
        {"customer": "ada", "amount": 7},
    ]
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://orders") as client,
    ):
        placed: set[int] = set()
        for body in requests:
            response = await client.post("/orders", json=body)
            print(f"POST /orders {body} -> {response.status_code} {response.json()}")
            if response.status_code == 201:
                placed.add(response.json()["order_id"])
        shipping: Shipping = app.state.shipping
        try:
            await shipping.wait_for(placed, timeout=30)
        except TimeoutError:
            print(f"timed out: shipped {sorted(shipping.shipped)}, placed {sorted(placed)}")
        pending = await settled_outbox(client)
        reached = len(placed & shipping.shipped)
    print(f"{reached} of {len(placed)} orders reached the consumer through the outbox; {pending} outbox row(s) pending")
    return 0 if reached == len(placed) == 3 and not pending else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
