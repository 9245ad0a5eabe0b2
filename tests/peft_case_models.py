"""The small models of peft's custom-model test table (huggingface/peft tests/test_custom_models.py), rewritten.

Each model has the module names and layer shapes of peft's model of the same id, so a case's ``target_modules``
select the same layers and peft's own shape checks (rank vs groups, block sizes vs features) see the same numbers.
Differences, all irrelevant to a parity test that runs both libraries on one model: the input is cast to the
model's own parameter dtype (so float64 models work), and each model takes a small seeded input from ``example``
instead of peft's ``arange(90)`` (Conv2dGroups2 reads it instead of building its own).

    model = build("Conv2d", dtype=torch.float64)   # seeded, eval mode
    x = example("Conv2d", model)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _Classifier(nn.Module):
    """The shared tail of the conv models: ReLU, Flatten, a linear head ``lin0`` and LogSoftmax (registered after the
    model's own layer, as in peft's models)."""

    def add_tail(self, head_in: int) -> None:
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(head_in, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def tail(self, h: Tensor) -> Tensor:
        return self.sm(self.lin0(self.flat(self.relu(h))))


class MLP(nn.Module):
    """lin0 (10 -> hidden) · ReLU · Dropout(0.5) · lin1 (hidden -> 2) · LogSoftmax. peft's "MLP" (hidden=20) and "MLP2"
    (hidden=32)."""

    def __init__(self, hidden: int = 20, bias: bool = True):
        super().__init__()
        self.lin0 = nn.Linear(10, hidden, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(hidden, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        h = self.drop(self.relu(self.lin0(X.to(_dtype(self)))))
        return self.sm(self.lin1(h))


class EmbConv1D(nn.Module):
    """emb (100 tokens, dim 5) · transformers Conv1D (5 -> 1) · ReLU · Flatten · lin0 (10 -> 2) · LogSoftmax; input:
    (batch, 10) token ids."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # nf=1 outputs, nx=5 inputs; weight stored (5, 1)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        h = self.flat(self.relu(self.conv1d(self.emb(X))))
        return self.sm(self.lin0(h))


class Conv1dModel(_Classifier):
    """conv1d: nn.Conv1d(channels_in, channels_out, kernel, groups) on the input as a length-10 signal repeated over
    channels_in channels, then the classifier tail. peft's "Conv1d" (1 -> 1, k=2), "Conv1dBigger" (64 -> 16, k=2) and
    "Conv1dGroups" (8 -> 8, k=3, groups=2)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 1):
        super().__init__()
        self.c_in = c_in  # the layer's own attribute is gone once peft wraps it
        self.conv1d = nn.Conv1d(c_in, c_out, kernel, groups=groups)
        self.add_tail(c_out * (10 - kernel + 1))

    def forward(self, X: Tensor) -> Tensor:
        signal = X.to(_dtype(self)).reshape(-1, 1, 10).expand(-1, self.c_in, -1)
        return self.tail(self.conv1d(signal))


class Conv2dModel(_Classifier):
    """conv2d: nn.Conv2d(channels_in, channels_out, kernel) on 3×3 images of channels_in channels (the input reshaped),
    then the classifier tail. peft's "Conv2d" (5 -> 10, k=3) and "Conv2d1x1" (1 -> 10, k=1)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True):
        super().__init__()
        self.c_in = c_in
        self.conv2d = nn.Conv2d(c_in, c_out, kernel, bias=bias)
        self.add_tail(c_out * (3 - kernel + 1) ** 2)

    def forward(self, X: Tensor) -> Tensor:
        return self.tail(self.conv2d(X.to(_dtype(self)).reshape(-1, self.c_in, 3, 3)))


class Conv2d2(nn.Module):
    """lin0 (10 -> 40) · ReLU · reshape to 8×3×3 images · conv2d (8 -> 32, k=3) · ReLU · Flatten · lin1 (32 -> 2) ·
    LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        images = self.relu(self.lin0(X.to(_dtype(self)))).reshape(-1, 8, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(images)))))


class Conv2dGroups(nn.Module):
    """The whole input (90 numbers) · lin0 (90 -> 288) · reshape to two 16×3×3 images · conv2d (16 -> 16, k=3,
    groups=8) · ReLU · Flatten · lin1 (16 -> 2) · LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)  # groups=8 divides peft's default r=8
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        images = self.lin0(X.to(_dtype(self)).flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(images)))))


class Conv2dGroups2(_Classifier):
    """conv2d (16 -> 32, k=3, padding=1, groups=2) on (batch, 16, 20, 20) images, then the classifier tail
    (lin0: 12800 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.add_tail(32 * 20 * 20)

    def forward(self, X: Tensor) -> Tensor:
        return self.tail(self.conv2d(X.to(_dtype(self))))


class Conv3dModel(_Classifier):
    """conv3d (5 -> 10, k=3) on 3×3×3 volumes (a 2-D input is repeated three times along a new last axis, then
    reshaped), then the classifier tail."""

    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.add_tail(10)

    def forward(self, X: Tensor) -> Tensor:
        X = X.to(_dtype(self))
        if X.ndim == 2:
            X = X.unsqueeze(-1).expand(*X.shape, 3)
        return self.tail(self.conv3d(X.reshape(-1, 5, 3, 3, 3)))


class MHA(nn.Module):
    """mha: nn.MultiheadAttention(10, 2 heads) as self-attention over an unbatched (seq, 10) input · lin0 (10 -> 2) ·
    LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        X = X.to(_dtype(self))
        attended, _ = self.mha(X, X, X)
        return self.sm(self.lin0(attended))


class ParameterLinear(nn.Module):
    """A linear layer that is no nn.Linear: y = x @ weight + bias with weight stored (in, out) as a bare parameter
    (what peft's target_parameters adapts)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out))
        self.bias = nn.Parameter(torch.ones(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """MLP's layout with ParameterLinear layers: lin0 (10 -> 20) · ReLU · Dropout · lin1 (20 -> 2) · LogSoftmax."""

    def __init__(self):
        super().__init__()
        self.lin0 = ParameterLinear(10, 20)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = ParameterLinear(20, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: Tensor) -> Tensor:
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(_dtype(self)))))))


# model id (as in peft's table) -> constructor
BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "MLP2": lambda: MLP(hidden=32),
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: Conv1dModel(1, 1, 2),
    "Conv1dBigger": lambda: Conv1dModel(64, 16, 2),
    "Conv1dGroups": lambda: Conv1dModel(8, 8, 3, groups=2),
    "Conv2d": lambda: Conv2dModel(5, 10, 3),
    "Conv2d1x1": lambda: Conv2dModel(1, 10, 1),
    "Conv2d2": Conv2d2,
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": Conv2dGroups2,
    "Conv3d": Conv3dModel,
    "MHA": MHA,
    "MlpUsingParameters": MlpUsingParameters,
}


def build(model_id: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Model ``model_id`` with weights drawn from ``seed`` (global RNG untouched), in ``dtype``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[model_id]()
    return model.to(dtype).eval()


def example(model_id: str, model: nn.Module, seed: int = 0) -> Tensor:
    """A small seeded input for ``model_id`` (float in the model's dtype; token ids for EmbConv1D)."""
    g = torch.Generator().manual_seed(seed)
    if model_id == "EmbConv1D":
        return torch.randint(0, 100, (3, 10), generator=g)
    if model_id == "Conv2dGroups2":
        return torch.randn(2, 16, 20, 20, generator=g).to(_dtype(model))
    # 90 numbers: Conv2dGroups reads exactly 90; Conv2d and Conv3d make two images / volumes of them
    return torch.randn(9, 10, generator=g).to(_dtype(model))
