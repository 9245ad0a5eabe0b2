"""lite_fn — functional parameter-efficient adapters for PyTorch.

    params = lf.init(key, model, lf.LoRAConfig(r=8), targets=r"(q_proj|v_proj)$")
    out = lf.call(model, params, input_ids)
"""
from . import linalg, variants
from ._keys import fold_in, split
from .variants import REGISTRY

__version__ = "0.1.0"

# One frozen config dataclass per variant, re-exported by its class name.
for _mod in REGISTRY.values():
    for _cls in getattr(_mod, "CONFIGS", (_mod.Config,)):
        globals()[_cls.__name__] = _cls
