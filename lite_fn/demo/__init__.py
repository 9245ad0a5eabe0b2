"""The runnable programs: demos that use lite_fn end to end. No library module imports this package.

Run them with ``python -m lite_fn.demo`` (needs the ``[demo]`` extra):

- ``sentiment``: the default, adapters on MiniLM-L6 (a real pretrained sentence encoder), scored on
  held-out negated-sentiment reviews; its data come from ``data``;
- ``steer`` (``--steer``): steering (AntiPaSTO) and routed LoRAs on SmolLM2-135M-Instruct, generate included.

``run`` dispatches between them (``__main__`` calls it); ``_shared`` holds what both programs use. The
programs never import each other. The names below are the sentiment demo's, ``main`` the dispatcher's.
"""

from lite_fn.demo.run import main
from lite_fn.demo.sentiment import embed, find_problems, load_encoder, margins

__all__ = ["embed", "find_problems", "load_encoder", "main", "margins"]
