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
    "full": lambda: [lf.FullConfig()],
    "trainable_tokens": lambda: [  # the dense view's input columns (an embedding's rows); a head's output rows
        __import__("lite_fn.variants.trainable_tokens", fromlist=["x"]).TrainableTokensConfig(token_indices=[5, 1, 17]),
        __import__("lite_fn.variants.trainable_tokens", fromlist=["x"]).TrainableTokensConfig(token_indices=[30, 2], side="out"),
    ],
    "ia3_ff": lambda: [lf.IA3FFConfig()],
    "road": lambda: [lf.ROADConfig(variant=v, group_size=8) for v in ("road_1", "road_2", "road_4")],
    "lokr": lambda: [  # W1 full, W2 a product; both products ("lycoris" init); both full (decompose_factor=8)
        __import__("lite_fn.variants.lokr", fromlist=["x"]).LoKrConfig(r=2, alpha=4),
        __import__("lite_fn.variants.lokr", fromlist=["x"]).LoKrConfig(r=1, alpha=3, decompose_both=True, init_weights="lycoris"),
        __import__("lite_fn.variants.lokr", fromlist=["x"]).LoKrConfig(r=4, decompose_factor=8),
    ],
    "boft": lambda: [
        __import__("lite_fn.variants.boft", fromlist=["x"]).BOFTConfig(block_size=4),
        __import__("lite_fn.variants.boft", fromlist=["x"]).BOFTConfig(block_num=4, n_butterfly_factor=2),
    ],
    "vera": lambda: [
        __import__("lite_fn.variants.vera", fromlist=["x"]).VeRAConfig(r=4),
        __import__("lite_fn.variants.vera", fromlist=["x"]).VeRAConfig(
            r=4, d_initial=0.5, projection_shape=(128, 128), projection_prng_key=3
        ),
    ],
    "loha": lambda: [  # r=4: the dense ΔW form on (32, 24); r=2: the factored form (loha.factored)
        __import__("lite_fn.variants.loha", fromlist=["x"]).LoHaConfig(r=4, alpha=8),
        __import__("lite_fn.variants.loha", fromlist=["x"]).LoHaConfig(r=2, alpha=3),
    ],
    "oft": lambda: [  # Neumann series (peft's default); exact Cayley + COFT (eps straddles the block norms); one shared block
        __import__("lite_fn.variants.oft", fromlist=["x"]).OFTConfig(r=4),
        __import__("lite_fn.variants.oft", fromlist=["x"]).OFTConfig(r=8, use_cayley_neumann=False, coft=True, eps=0.5),
        __import__("lite_fn.variants.oft", fromlist=["x"]).OFTConfig(r=2, block_share=True, num_cayley_neumann_terms=3),
    ],
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
