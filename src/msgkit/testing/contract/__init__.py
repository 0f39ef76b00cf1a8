"""The msgkit transport contract suite: one set of tests every transport must pass.

Run it against your own broker::

    pytest --pyargs msgkit.testing.contract --msgkit-url amqp://guest:guest@localhost/

Tests are gated by the transport's declared :class:`msgkit.Capabilities`, never by its name;
a test whose capability is absent is skipped with the reason. See docs/testing.md.
"""
