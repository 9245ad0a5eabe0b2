"""EVA (Explained Variance Adaptation) — Paischer et al. 2024, arXiv 2410.07170.

    y = x Wᵀ + b + s · (x Aᵀ) Bᵀ,      s = alpha / r   (rsLoRA: alpha / √r)     — LoRA's forward

    A (r, d_in)  = top-r principal directions of the layer's centred calibration inputs
                   (rows, unit norm; with whiten=True row i is divided by λ_i^¼, λ_i the
                   i-th eigenvalue of Σ(x−μ)(x−μ)ᵀ — peft's division by √(singular value), so,
                   as in peft, the lengths shrink like tokens^−¼; peft divides rows shared by
                   q/k/v once per layer, in place — a bug we do not copy);               trainable
    B (d_out, r) = 0;                                                            trainable
    scale ()     = s;                                                            frozen leaf

Identity at init: B = 0.
Dropout (``dropout`` leaf, with the runtime's ``noise``) as LoRA's, on the adapter input.

Calibration streams sufficient statistics (token count, mean, centred scatter Σ(x−μ)(x−μ)ᵀ,
merged per batch in float64 with Chan et al.'s pairwise update), so memory is O(d_in²),
independent of the number of tokens, and the PCA is exact (eigh of the scatter). peft's
``IncrementalPCA`` instead keeps only the top r·rho components between batches (and uses a
randomized SVD); the two agree exactly whenever the inputs span at most r·rho directions,
and we are exact otherwise.

Conventions copied from peft (tuners/lora/eva.py, utils/incremental_pca.py):
  * sign: each component is flipped so that its largest-|·| entry is positive (``svd_flip``
    with ``u_based_decision=False``), so A rows equal peft's, not just up to sign;
  * explained variance ratio: λ_i / trace(scatter) (peft: S_i² / Σ var·n);
  * tau: a component has converged when |cos| with the same component after the previous
    update is >= tau (peft: signed cos after its sign flip — the same unless the flip is
    ambiguous); a Stat is ``converged`` when all its r·rho components have (peft checks only
    the first rank_dist[layer], which it learns mid-loop; a Stat cannot know its planned
    rank, so it waits for all it may be given). Checked at every update (one d_in×d_in eigh);
  * rho / ``plan``: every layer offers its top round(r·rho) explained-variance ratios; the
    r·n_layers largest over all layers are kept (ties broken by layer order, which also gives
    peft's "the first of a group of identical inputs gets the highest rank"); a layer's rank
    is how many of its own it kept; rank 0 means no adapter (peft swaps the base layer back);
    with adjust_scaling_factors (peft default True) alpha ← alpha · (new_r / r).
Not here: peft's rho > 1000 clamp (we cap r·rho at d_in instead, where peft would raise);
peft's skipping of batches with fewer rows than r·rho (every token counts here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import _checks, _keys
from .._contract import PeftCodec, never_random
from . import _arithmetic, _padding, lora

__all__ = [
    "MERGE",
    "NAME",
    "PEFT",
    "TRAINABLE",
    "Config",
    "EVAConfig",
    "Stat",
    "apply",
    "apply_runs",
    "init",
    "merged",
    "pad",
    "plan",
    "random_init",
    "shapes",
    "stat",
]  # the variant contract; other names are shared helpers
NAME = "eva"
TRAINABLE = frozenset({"A", "B"})  # leaves an optimizer updates
apply_runs = lora.apply_runs  # the same leaves and product as LoRA
merged = lora.merged  # and the same dense layer: (W + s·BA, b)
MERGE = _arithmetic.LOWRANK  # adapter arithmetic (merge_adapters): LoRA's, the same leaves

random_init = never_random  # init draws no random numbers


@dataclass(frozen=True)
class EVAConfig:
    r: int = 8
    alpha: float = 16.0
    rho: float = 2.0  # max per-layer rank after redistribution: round(r·rho); 1.0 = no redistribution
    tau: float = 0.99  # cosine threshold for "the directions stopped moving"
    use_rslora: bool = False
    whiten: bool = False  # peft EvaConfig.whiten
    adjust_scaling_factors: bool = True  # peft EvaConfig.adjust_scaling_factors: keep alpha/r when plan() changes r
    dropout: float = 0.0  # as LoRAConfig.dropout
    variant_name: ClassVar[str] = NAME

    def __post_init__(self):
        who = type(self).__name__
        _checks.positive_int("r", self.r, who)
        _checks.finite_number("alpha", self.alpha, who)
        _checks.finite_number("rho", self.rho, who)
        if self.rho < 1.0:
            raise ValueError(f"{who}: rho={self.rho!r} must be >= 1.0 (1.0 keeps every layer at rank r; peft's default is 2.0)")
        _checks.finite_number("tau", self.tau, who)
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"{who}: tau={self.tau!r} must be in [0, 1] (a cosine-similarity threshold; peft's default is 0.99)")
        lora.check_dropout(self.dropout, who)

    @property
    def scale(self) -> float:
        return lora.scaling(self.alpha, self.r, self.use_rslora)

    @property
    def n_components(self) -> int:
        return round(self.r * self.rho)  # peft: max_components = round(r * rho)


Config = EVAConfig


class Stat:
    """Streaming PCA statistic of one layer's inputs: O(d_in²) float64 state, never the inputs."""

    def __init__(self, d_in: int, n_components: int, tau: float, device: torch.device):
        self.d_in, self.n_components, self.tau = d_in, min(n_components, d_in), tau
        self.share_key = (NAME, d_in, self.n_components, tau)  # depends on the inputs only, not on W
        self.tokens = 0
        self.converged = False
        f64: dict = {"dtype": torch.float64, "device": device}
        self.mean = torch.zeros(d_in, **f64)
        self.scatter = torch.zeros(d_in, d_in, **f64)  # Σ (x − μ)(x − μ)ᵀ
        self.eigvals = torch.zeros(d_in, **f64)  # PCA of the data so far (descending), refreshed per update
        self.components = torch.zeros(d_in, d_in, **f64)  # rows, sign-fixed like peft

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.scatter, self.eigvals, self.components))

    def update(self, x: Tensor) -> None:
        X = _rows(x, self.d_in, "eva.Stat.update").to(self.mean.device)
        n, N = X.shape[0], self.tokens
        if n == 0:
            return
        mean_b = X.mean(0)
        Xc = X - mean_b
        delta = mean_b - self.mean
        # Chan et al.: merge (N, μ, M) with the batch's (n, μ_b, M_b) — exact, no cancellation.
        self.scatter = self.scatter + Xc.T @ Xc + torch.outer(delta, delta) * (N * n / (N + n))
        self.mean = self.mean + delta * (n / (N + n))
        self.tokens = N + n
        previous = self.components[: self.n_components]
        self.eigvals, self.components = _pca(self.scatter)
        if N > 0:
            cos = (self.components[: self.n_components] * previous).sum(-1).abs()
            self.converged = bool((cos >= self.tau).all())

    def explained_variance_ratio(self) -> Tensor:
        """λ_i / Σλ for all d_in components, descending (float64)."""
        return self.eigvals / self.scatter.trace().clamp_min(torch.finfo(torch.float64).tiny)


def _pca(scatter: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a scatter matrix: (eigenvalues desc, components as sign-fixed rows)."""
    evals, evecs = torch.linalg.eigh(scatter)
    evals, comps = evals.flip(0).clamp_min(0.0), evecs.flip(1).T
    pivot = comps.abs().argmax(dim=1)  # peft svd_flip(u_based_decision=False): largest-|·| entry > 0
    signs = torch.sign(comps.gather(1, pivot[:, None]))
    return evals, comps * signs


def _rows(x: Tensor, d_in: int, who: str) -> Tensor:
    """Flatten calibration inputs to float64 (tokens, d_in); reject the wrong width and NaN/inf."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor of shape (..., {d_in}), got {type(x).__name__}")
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ValueError(
            f"{who}: x has shape {tuple(x.shape)} but the layer expects d_in={d_in}; pass inputs of shape (..., {d_in})"
        )
    X = x.detach().reshape(-1, d_in).to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise ValueError(
            f"{who}: x contains {int((~torch.isfinite(X)).sum())} NaN/inf entries; calibration inputs must be finite"
        )
    return X


def stat(cfg: EVAConfig, W: Tensor) -> Stat:
    _, d_in = _checks.check_weight(W, "eva.stat")
    return Stat(d_in, cfg.n_components, cfg.tau, W.device)


def check_stat(statistic, r: int, d_in: int, who: str) -> None:
    _checks.calibration_stat(statistic, Stat, r, who, "EVA", "eva.stat(cfg, W)")
    if statistic.d_in != d_in:
        raise ValueError(
            f"{who}: stat was built for d_in={statistic.d_in} but W has d_in={d_in}; build it with eva.stat(cfg, W) for this layer"
        )


def init(key: _keys.Key, W: Tensor, cfg: EVAConfig, statistic: Stat | None = None) -> dict[str, Tensor]:
    who = "eva.init"
    d_out, d_in = _checks.check_weight(W, who)
    _checks.check_rank(cfg.r, d_out, d_in, who)
    check_stat(statistic, cfg.r, d_in, who)
    assert isinstance(statistic, Stat)  # check_stat raised otherwise
    A = statistic.components[: cfg.r]  # (r, d_in) float64
    if cfg.whiten:
        A = A / statistic.eigvals[: cfg.r, None].clamp_min(torch.finfo(torch.float64).tiny).pow(0.25)
    opts = _checks.like(W)
    return {
        "A": A.to(**opts).requires_grad_(True),
        "B": torch.zeros(d_out, cfg.r, **opts).requires_grad_(True),
        "scale": torch.tensor(cfg.scale, **opts),
        **lora.dropout_leaf(cfg, opts),
    }


def shapes(leaves: dict[str, tuple[int, ...]], d_out: int, d_in: int) -> dict[str, tuple[int, ...]]:
    """The exact leaf shapes for W of (d_out, d_in) (LoRA's); the rank r is read from A."""
    return lora.shapes(leaves, d_out, d_in)


def pad(path: str, present: dict, K: int, own) -> dict:
    """lf.stack(pad=True): as LoRA (zero rank rows/columns; no adapter here: zero factors)."""
    return _padding.lowrank(NAME, path, present, K, {"A": 0, "B": 1})


def plan(
    stats: dict[str, Stat], cfgs: dict[str, EVAConfig], dims: dict[str, tuple[int, int]] | None = None
) -> dict[str, EVAConfig | None]:
    """peft's rank redistribution: {layer: cfg with its new r (alpha adjusted), or None = no adapter}.

    Budget Σ r over layers; each layer offers its top round(r·rho) explained-variance ratios,
    never more than min(d_out, d_in) of its weight (``dims[layer]``) or the tokens it saw (a
    rank above either would be a direction the data or the layer cannot have); the budget's
    worth of largest ratios is kept (stable sort: ties go to the earlier layer).
    """
    if stats.keys() != cfgs.keys():
        raise ValueError(
            f"eva.plan: stats and cfgs must name the same layers; only in stats: {sorted(stats.keys() - cfgs.keys())}, only in cfgs: {sorted(cfgs.keys() - stats.keys())}"
        )
    owners, ratios = [], []
    for name, cfg in cfgs.items():
        statistic = stats[name]
        check_stat(statistic, cfg.r, getattr(statistic, "d_in", 0), f"eva.plan[{name!r}]")
        d_out, d_in = (dims or {}).get(name, (statistic.d_in, statistic.d_in))
        evr = statistic.explained_variance_ratio()[: min(cfg.n_components, d_in, d_out, statistic.tokens)].cpu()
        owners += [name] * evr.numel()
        ratios.append(evr)
    order = torch.sort(torch.cat(ratios), descending=True, stable=True).indices
    budget = sum(cfg.r for cfg in cfgs.values())
    counts = {name: 0 for name in cfgs}
    for i in order[:budget].tolist():
        counts[owners[i]] += 1
    out: dict[str, EVAConfig | None] = {}
    for name, cfg in cfgs.items():
        new_r = counts[name]
        if new_r == 0:
            out[name] = None
        elif new_r == cfg.r:
            out[name] = cfg
        else:
            alpha = cfg.alpha * (new_r / cfg.r) if cfg.adjust_scaling_factors else cfg.alpha
            out[name] = dataclasses.replace(cfg, r=new_r, alpha=alpha)
    return out


def apply(params: dict[str, Tensor], W: Tensor, x: Tensor, b: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    _checks.check_input(x, W, "eva.apply")
    return lora.linear_delta(x, W, b, params, lora.dropped(params, x, noise))


# peft: written as plain LoRA (its init is data-driven; the adapter itself is A, B, scale). peft's EVA files
# are plain LoRA too, so they read back as lora.
PEFT = PeftCodec(format=lora.PEFT_LORA, write=lora.PEFT.write)
