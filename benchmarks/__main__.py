"""``python -m benchmarks``: msgkit against the raw clients and FastStream (see benchmarks/suite.py)."""

import sys

from benchmarks.suite import main

sys.exit(main())
