"""lite_fn — functional parameter-efficient adapters for PyTorch.

    import lite_fn as lf
    params = lf.init(0, model, lf.LoRAConfig(r=8), targets=r"(q_proj|v_proj)$")
    out = lf.call(model, params, input_ids)          # == model(input_ids), adapted
"""
from . import linalg, variants
from ._keys import fold_in, split
from .io import check_against, load, load_metadata, save
from .runtime import call, combine, init, merge, partition, stack, target_paths, trainable, unstack, with_alpha
from .variants import REGISTRY

__version__ = "0.1.0"

# One frozen config dataclass per variant, re-exported by its class name (LoRAConfig, DoRAConfig, …).
for _mod in REGISTRY.values():
    for _cls in getattr(_mod, "CONFIGS", (_mod.Config,)):
        globals()[_cls.__name__] = _cls
