"""Developer sessions. `nox -s tests` runs the whole suite in its own virtualenv."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Unit and integration tests. Brokers come from MSGKIT_*_URL, Docker, or are skipped."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "src", "tests", "examples", "benchmarks", "chaos", "scripts", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "examples", "benchmarks", "chaos", "scripts", "noxfile.py")
    session.run("mypy", "src")


@nox.session(python=PYTHON)
def quickstart(session: nox.Session) -> None:
    """Run examples/quickstart.py on memory://."""
    session.install("-e", ".")
    session.run("python", "examples/quickstart.py", env={"MSGKIT_URL": "memory://"})


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every example and check its output (scripts/run_examples.py): memory:// always, each
    broker whose MSGKIT_*_URL is set; MSGKIT_REQUIRE_BROKERS=1 fails on a missing one. Pass -k NAME."""
    session.install("-e", ".[examples]")
    session.run("python", "scripts/run_examples.py", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Check docs/capabilities.md against the code, then build the site with mkdocs --strict.

    Arguments after -- go to the capability check, e.g. to check a contract run's results:
    nox -s docs -- --results contract.json --allow-unproven sqs:persistent
    """
    session.install("-e", ".[docs]")
    session.run("python", "-m", "msgkit.testing.matrix", "--check", "docs/capabilities.md", *session.posargs)
    session.run("mkdocs", "build", "--strict", env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Engine throughput on memory:// (benchmarks/engine.py); pass options after --."""
    session.install("-e", ".")
    session.run("python", "-m", "benchmarks.engine", *session.posargs)


@nox.session(python=PYTHON)
def benchmarks(session: nox.Session) -> None:
    """msgkit vs raw clients vs FastStream on every broker with a MSGKIT_*_URL (python -m benchmarks)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def chaos(session: nox.Session) -> None:
    """The fault-injection suite (chaos/, docs/fault-injection.md): kills consumers and RESTARTS
    the brokers named by MSGKIT_<BROKER>_RESTART_COMMAND. `nox -s chaos -- --short` is CI's version."""
    session.install("-e", ".[all]")
    session.run("python", "-m", "chaos", *session.posargs)
