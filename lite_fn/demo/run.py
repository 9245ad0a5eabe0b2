"""The one place that picks a demo program: ``--steer`` runs ``steer``, anything else runs ``sentiment``."""

from __future__ import annotations

import sys

from lite_fn.demo import sentiment, steer


def main(argv: list[str] | None = None) -> dict:
    """Run a demo; returns its results (also written under --out), "problems" included.

    ``--steer`` runs the steering demo (``lite_fn.demo.steer``, its own options and results); without it
    the sentiment demo runs (``lite_fn.demo.sentiment``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--steer" in argv:
        return steer.main([a for a in argv if a != "--steer"])
    return sentiment.main(argv)
