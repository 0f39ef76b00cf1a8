"""Transports: one broker per module, behind the SPI in :mod:`msgkit.transports.base`.

Transports are found by URL scheme through :mod:`msgkit.transports.registry`, which imports the
built-in modules lazily: importing this package imports no broker client.
"""
