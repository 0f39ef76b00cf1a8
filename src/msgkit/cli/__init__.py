"""The ``msgkit`` command line: ``msgkit --help`` lists the commands, ``msgkit COMMAND --help`` teaches one.

    msgkit send   URL TOPIC [BODY | - | --file F] [--key K] [--header N=V ...] [--id ID] [--count N]
    msgkit tail   URL TOPIC GROUP [--ack] [--limit N] [--timeout S]
    msgkit check  URL [--topic T]
    msgkit bench  URL [--count N] [--size B] [--max-in-flight M]
    msgkit dlq    list|show|replay|purge URL TOPIC GROUP ...
    msgkit outbox relay|create-schema DB_URL ...

Every command takes ``--json`` (machine-readable output on stdout, errors on stderr). Exit codes:
0 done, 1 not found, 2 bad usage or configuration, 3 broker unreachable or failing.

Output uses rich (the ``cli`` extra) on a terminal when it is installed, and plain text otherwise.
"""

from msgkit.cli.app import build_parser, main, run
from msgkit.cli.common import EXIT_BROKER, EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from msgkit.cli.output import plain_progress as _progress  # noqa: F401 - kept for callers of the old module

__all__ = ["EXIT_BROKER", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_USAGE", "build_parser", "main", "run"]
