"""``python -m lite_fn.demo [--steer] [options]``: runs a demo program; exit status 1 when it reports problems."""

import sys

from lite_fn.demo.run import main

if __name__ == "__main__":
    sys.exit(1 if main()["problems"] else 0)
