"""msgkit's fault-injection suite: real producer and consumer processes against real brokers,
with consumers killed, brokers restarted, poison messages and failing handlers, and every outcome
counted from the database. Run it with ``python -m chaos`` (see docs/fault-injection.md).
"""
