"""``python -m msgkit.cli``."""

from msgkit.cli.app import run

if __name__ == "__main__":
    run()
