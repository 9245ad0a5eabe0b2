"""``lf.Adapted``: an ``nn.Module`` facade over ``lf.call``, so that engines built around modules
(``DistributedDataParallel``, ``transformers.Trainer``, ``torch.optim`` by ``parameters()``) train
lite_fn adapters as they train any module.

    module = lf.Adapted(model, params)
    module.parameters()          # exactly the trainable leaves (each variant's TRAINABLE)
    module(*args, **kwargs)      # == lf.call(model, module.params, *args, **kwargs)
    module.params                # the current params tree, frozen leaves included

The base model is deliberately *not* a submodule: it is kept in a plain attribute, so
``parameters()``, ``state_dict()``, ``.to()``, ``.train()`` and DDP's broadcasts and gradient
all-reduces see the adapter leaves only, and the (possibly sharded, offloaded or shared) base model
is never copied, moved, synchronised or mutated.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Mapping

from torch import Tensor, nn

from . import _inject, runtime
from .trees import Params, is_trainable


def _leaf_name(path: str, variant: str, leaf: str, taken: set[str], module: nn.Module) -> str:
    """A registrable attribute name for one leaf: the checkpoint key with dots as double
    underscores (module paths hold dots, which ``register_parameter`` refuses), made unique."""
    name = f"{path}.{variant}.{leaf}".replace(".", "__")
    unique, n = name, 1
    while unique in taken or hasattr(module, unique):  # e.g. paths "a__b.c" and "a.b__c"
        unique, n = f"{name}_{n}", n + 1
    return unique


# {base model class: its facade class}; see Adapted.__new__
_FACADES: weakref.WeakKeyDictionary[type, type[Adapted]] = weakref.WeakKeyDictionary()


def _facade_class(model_cls: type) -> type[Adapted]:
    """``Adapted[<model class>]``: Adapted whose ``forward`` shows the model class's signature.

    Engines read the signature of the module they train: ``transformers.Trainer`` keeps only the
    dataset columns ``forward`` names, finds the label columns (``labels``) by name, and so on.
    A bare ``forward(*args, **kwargs)`` would make it drop every column. The wrapper only carries
    the signature; it calls ``Adapted.forward``.
    """
    cls = _FACADES.get(model_cls)
    if cls is None:

        def forward(self, *args, **kwargs):
            return Adapted.forward(self, *args, **kwargs)

        with contextlib.suppress(TypeError, ValueError):  # no introspectable signature: keep (*args, **kwargs)
            forward.__signature__ = inspect.signature(model_cls.forward)
        forward.__doc__ = Adapted.forward.__doc__
        name = f"Adapted[{model_cls.__name__}]"
        forward.__qualname__ = f"{name}.forward"
        cls = type(name, (Adapted,), {"forward": forward, "__module__": __name__, "__doc__": Adapted.__doc__})
        _FACADES[model_cls] = cls
    return cls


def _empty_facade(model_cls: type) -> Adapted:
    """An uninitialised ``Adapted[model_cls]`` for unpickling (its state is set next)."""
    return nn.Module.__new__(_facade_class(model_cls))


class Adapted(nn.Module):
    """``model`` with the adapters ``params``, as an ``nn.Module`` whose parameters are the adapters.

    Args:
        model: the base model. It is held in a plain attribute (``.model``), not registered as a
            submodule: ``parameters()``, ``state_dict()``, ``.to()``, ``.train()`` / ``.eval()``,
            DDP and Trainer never see, move, synchronise or change it. Place it (device, FSDP2
            sharding, ``device_map``) and set its train/eval mode yourself.
        params: a params tree from ``lf.init`` / ``lf.load`` (``{path: {variant: {leaf: Tensor}}}``).
            Its leaves are *copied* into the module: trainable leaves (the variant's
            ``TRAINABLE``) become ``nn.Parameter``s, the others (scales, frozen bases, steering
            alpha) persistent buffers. ``params`` itself is left as it was.
        base: the weights of a stateless model (a meta-device skeleton), as ``lf.call`` takes them.
        checkpointing: turn on transformers' activation checkpointing for you, with the recompute
            seeing the adapters: ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=
            {"use_reentrant": False, "context_fn": lf.checkpoint_context})`` — the one change to the
            base model lite_fn makes, and only when asked. For any other model wrap its blocks in
            ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False, context_fn=lf.checkpoint_context)``.

    ``forward(*args, **kwargs)`` is ``lf.call(model, self.params, *args, base=base, **kwargs)``, so
    it returns what the model returns (with ``labels=``, a Hugging Face model's output ``.loss``),
    and takes ``lf.call``'s keywords (``route=``, ``base=``, ``key=``, ``freeze_base=``). The object
    is an ``Adapted[<model class>]``, a subclass made once per model class whose ``forward`` shows
    the model's signature, because engines read it: ``transformers.Trainer`` keeps the dataset
    columns the forward names and finds ``labels`` there. ``accepts_loss_kwargs`` and
    ``loss_type`` are the model's too, so Trainer normalises the loss as for the bare model.

    Leaves are registered under their checkpoint key with ``.`` replaced by ``__`` (for example
    ``model__layers__0__self_attn__q_proj__lora__A``); ``tree_keys`` maps each registered name back
    to ``(module_path, variant, leaf)``. ``state_dict()`` holds exactly the adapter leaves,
    trainable and frozen, and ``load_state_dict`` restores them exactly; ``lf.save(path,
    module.params)`` writes a lite_fn checkpoint. Frozen leaves never change, so under DDP
    ``broadcast_buffers=False`` saves a broadcast per step.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``params`` is not a non-empty params tree.
        ValueError: a path holds no variant or several.
        KeyError: an unknown variant name.

    Example:
        >>> import torch, lite_fn as lf
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> module = lf.Adapted(model, lf.init(0, model, lf.LoRAConfig(r=2), targets=r"^0$"))
        >>> [name for name, _ in module.named_parameters()], list(module.state_dict())
        (['0__lora__A', '0__lora__B'], ['0__lora__A', '0__lora__B', '0__lora__scale'])
        >>> x = torch.randn(4, 8)
        >>> opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
        >>> module(x).square().mean().backward()
        >>> opt.step()
        >>> torch.equal(module(x), lf.call(model, module.params, x)), list(module.children())
        (True, [])
    """

    # set in __init__ with object.__setattr__, outside nn.Module's registries
    model: nn.Module
    base: Mapping[str, Tensor] | None
    _tree_keys: dict[str, tuple[str, str, str]]

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        # a subclass per model class, whose forward shows the model's signature (see _facade_class)
        facade = _facade_class(type(model)) if cls is Adapted and isinstance(model, nn.Module) else cls
        return nn.Module.__new__(facade)

    def __init__(
        self, model: nn.Module, params: Params, *, base: Mapping[str, Tensor] | None = None, checkpointing: bool = False
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"lf.Adapted(model, params): model must be an nn.Module, got {type(model).__name__}")
        if checkpointing:
            kwargs = {"use_reentrant": False, "context_fn": _inject.checkpoint_context}
            new, old = (
                getattr(model, "activation_checkpointing_enable", None),
                getattr(model, "gradient_checkpointing_enable", None),
            )
            if not callable(new) and not callable(old):
                raise TypeError(
                    f"lf.Adapted(..., checkpointing=True) turns on transformers' activation checkpointing, but "
                    f"{type(model).__name__} has no gradient_checkpointing_enable(); wrap its blocks yourself in "
                    f"torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=lf.checkpoint_context)"
                )
            if callable(new):  # transformers 5 (gradient_checkpointing_enable is its deprecated alias)
                new(activation_checkpointing_kwargs=kwargs)
            else:
                old(gradient_checkpointing_kwargs=kwargs)  # pyright: ignore[reportOptionalCall]
        if not isinstance(params, dict) or not params:
            raise TypeError(
                f"lf.Adapted(model, params): params must be a non-empty dict from lf.init or lf.load "
                f"({{path: {{variant: {{leaf: Tensor}}}}}}), got {type(params).__name__}"
            )
        # outside nn.Module's registries on purpose: not a submodule (see the class docstring)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "base", base)
        keys: dict[str, tuple[str, str, str]] = {}
        for path, by_variant in params.items():
            if not isinstance(by_variant, dict) or len(by_variant) != 1:
                raise ValueError(
                    f"params[{path!r}] must hold exactly one variant, got "
                    f"{list(by_variant) if isinstance(by_variant, dict) else type(by_variant).__name__}"
                )
            ((variant, leaves),) = by_variant.items()
            if not isinstance(leaves, dict):
                raise TypeError(f"params[{path!r}][{variant!r}] must be a dict {{leaf: Tensor}}, got {type(leaves).__name__}")
            for leaf, value in leaves.items():
                if not isinstance(value, Tensor):
                    raise TypeError(
                        f"params[{path!r}][{variant!r}][{leaf!r}] is a {type(value).__name__}; every leaf must be a Tensor"
                    )
                name = _leaf_name(path, variant, leaf, set(keys), self)
                own = value.detach().clone()
                if is_trainable(variant, leaf):  # KeyError naming the known variants for an unknown one
                    self.register_parameter(name, nn.Parameter(own))
                else:
                    self.register_buffer(name, own)
                keys[name] = (path, variant, leaf)
        object.__setattr__(self, "_tree_keys", keys)

    def __reduce_ex__(self, protocol):
        # pickle and deepcopy: rebuild the facade class from the model class (it is made at run time)
        return _empty_facade, (type(self.model),), self.__getstate__()

    def __setattr__(self, name: str, value) -> None:
        if name in ("model", "base"):
            raise AttributeError(
                f"lf.Adapted.{name} is fixed at construction (the base model stays outside the module "
                f"tree); build a new one: lf.Adapted(other_model, adapted.params)"
            )
        super().__setattr__(name, value)

    @property
    def tree_keys(self) -> dict[str, tuple[str, str, str]]:
        """``{registered name: (module_path, variant, leaf)}`` for every leaf, in ``params`` order."""
        return dict(self._tree_keys)

    @property
    def params(self) -> Params:
        """The current params tree: this module's own parameters and buffers (no copies), so
        ``lf.call(adapted.model, adapted.params, x)`` is ``adapted(x)`` and gradients reach them."""
        out: Params = {}
        for name, (path, variant, leaf) in self._tree_keys.items():
            out.setdefault(path, {}).setdefault(variant, {})[leaf] = getattr(self, name)
        return out

    def forward(self, *args, **kwargs):
        """``lf.call(self.model, self.params, *args, base=self.base, **kwargs)``."""
        kwargs.setdefault("base", self.base)
        return runtime.call(self.model, self.params, *args, **kwargs)

    # Read by transformers.Trainer on the module it trains; mirrored from the base model so the
    # loss is normalised as for the bare model (token counts over shifted causal-LM labels).
    @property
    def accepts_loss_kwargs(self) -> bool:
        """The base model's ``accepts_loss_kwargs`` (or whether its ``forward`` takes ``**kwargs``)."""
        own = getattr(self.model, "accepts_loss_kwargs", None)
        if own is not None:
            return bool(own)
        try:
            sig = inspect.signature(self.model.forward)
        except (TypeError, ValueError):
            return False
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())

    @property
    def loss_type(self):
        """The base model's ``loss_type`` (None when it has none)."""
        return getattr(self.model, "loss_type", None)

    def extra_repr(self) -> str:
        layers = {path for path, _, _ in self._tree_keys.values()}
        names = sorted({variant for _, variant, _ in self._tree_keys.values()})
        n_train = sum(p.numel() for p in self.parameters())
        n_all = n_train + sum(b.numel() for b in self.buffers())
        return (
            f"model={type(self.model).__name__}, layers={len(layers)}, variants={names}, "
            f"trainable={n_train:,} of {n_all:,} adapter values"
        )
