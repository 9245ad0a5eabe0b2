"""lite_fn — functional parameter-efficient adapters for PyTorch.

    import lite_fn as lf
    params = lf.init(0, model, lf.LoRAConfig(r=8), targets=r"(q_proj|v_proj)$")
    out = lf.call(model, params, input_ids)          # == model(input_ids), adapted

Only re-exports live here; each variant's math is in ``lite_fn/variants/<name>.py``.
"""

from . import linalg, train, variants
from ._contract import Stat, Variant, VariantSpec
from ._inject import checkpoint_context
from ._keys import fold_in, split
from ._version import __version__ as __version__
from .adapted import Adapted
from .io import check_against, load, load_metadata, save
from .merging import merge_adapters
from .peft_io import load_peft, save_peft
from .runtime import applied, call, init, merge, target_paths
from .trees import combine, partition, stack, trainable, unstack, with_alpha
from .variants import REGISTRY
from .variants import register as register_variant
from .variants.antipasto import AntiPaSTOConfig
from .variants.boft import BOFTConfig
from .variants.delora import DeLoRAConfig
from .variants.dora import DoRAConfig
from .variants.eva import EVAConfig
from .variants.full import FullConfig
from .variants.hra import HRAConfig
from .variants.ia3 import IA3Config
from .variants.ia3_ff import IA3FFConfig
from .variants.loha import LoHaConfig
from .variants.lokr import LoKrConfig
from .variants.lora import LoRAConfig
from .variants.oft import OFTConfig
from .variants.pissa import PiSSAConfig
from .variants.road import ROADConfig
from .variants.vera import VeRAConfig

__all__ = [
    "REGISTRY",
    "Adapted",
    "AntiPaSTOConfig",
    "BOFTConfig",
    "DeLoRAConfig",
    "DoRAConfig",
    "EVAConfig",
    "FullConfig",
    "HRAConfig",
    "IA3Config",
    "IA3FFConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoRAConfig",
    "OFTConfig",
    "PiSSAConfig",
    "ROADConfig",
    "Stat",
    "Variant",
    "VariantSpec",
    "VeRAConfig",
    "applied",
    "call",
    "check_against",
    "checkpoint_context",
    "combine",
    "fold_in",
    "init",
    "linalg",
    "load",
    "load_metadata",
    "load_peft",
    "merge",
    "merge_adapters",
    "partition",
    "register_variant",
    "save",
    "save_peft",
    "split",
    "stack",
    "target_paths",
    "train",
    "trainable",
    "unstack",
    "variants",
    "with_alpha",
]
