"""Small example configs for every registered variant (W is (D_OUT, D_IN) in the generic tests)."""

import lite_fn as lf

D_OUT, D_IN = 32, 24

_CASES = {
    "lora": lambda: [lf.LoRAConfig(r=4, alpha=8), lf.LoRAConfig(r=4, alpha=8, use_rslora=True, init="gaussian")],
    "dora": lambda: [lf.DoRAConfig(r=4, alpha=8)],
    "pissa": lambda: [lf.PiSSAConfig(r=4, alpha=8), lf.PiSSAConfig(r=4, alpha=6, niter=4)],
    "delora": lambda: [lf.DeLoRAConfig(r=4)],
    "eva": lambda: [lf.EVAConfig(r=4, alpha=8)],
    "hra": lambda: [lf.HRAConfig(r=4)],
    "ia3": lambda: [lf.IA3Config()],
    "ia3_ff": lambda: [lf.IA3FFConfig()],
    "road": lambda: [lf.ROADConfig(variant=v, group_size=8) for v in ("road_1", "road_2", "road_4")],
    "antipasto": lambda: [
        lf.AntiPaSTOConfig(r=8, block_size=4),
        lf.AntiPaSTOConfig(r=8, block_size=4, rotate_u=True, select="data"),
    ],
}


def all_cases():
    """[(variant name, cfg)] for every registered variant; a registered variant without a case fails."""
    out = []
    for name in lf.REGISTRY:
        if name not in _CASES:
            raise RuntimeError(f"tests/cases.py has no example config for registered variant {name!r}")
        out += [(name, cfg) for cfg in _CASES[name]()]
    return out


def case_id(case):
    name, cfg = case
    return f"{name}-{cfg}"
