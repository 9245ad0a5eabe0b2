"""lf.Adapted: an nn.Module whose parameters are exactly the trainable leaves, whose forward is lf.call,
whose state_dict is exactly the adapter leaves, and which keeps the base model out of its module tree;
and transformers.Trainer training it. (DistributedDataParallel and FSDP2: test_distributed.py.)"""

import copy
import inspect

import pytest
import torch
from helpers import moved
from models import tiny, tokens
from torch import nn

import lite_fn as lf

TARGETS = r"(q_proj|v_proj|down_proj)$"


def leaves_of(params):
    return {(p, n, k): v for p, bv in params.items() for n, lv in bv.items() for k, v in lv.items()}


@pytest.fixture
def model():
    return tiny("llama")


@pytest.mark.parametrize(
    "cfg", [lf.LoRAConfig(r=4), lf.PiSSAConfig(r=4), lf.AntiPaSTOConfig(r=8, block_size=4)], ids=lambda c: type(c).__name__
)
def test_parameters_are_the_trainable_leaves_and_buffers_the_frozen_ones(model, cfg):
    params = moved(lf.init(0, model, cfg, targets=TARGETS))
    module = lf.Adapted(model, params)
    assert isinstance(module, lf.Adapted) and isinstance(module, nn.Module)
    trainable = [v for v in lf.trainable(params)]
    mine = list(module.parameters())
    assert len(mine) == len(trainable) and all(torch.equal(a, b) for a, b in zip(mine, trainable))
    frozen = [v for v in leaves_of(params).values() if not v.requires_grad]
    assert len(frozen) > 0 and len(list(module.buffers())) == len(frozen)
    # every registered name maps back to its place in the tree, and .params rebuilds the tree exactly
    for name, key in module.tree_keys.items():
        assert torch.equal(getattr(module, name), leaves_of(params)[key])
    rebuilt = module.params
    assert list(rebuilt) == list(params)
    assert leaves_of(rebuilt).keys() == leaves_of(params).keys()
    assert all(torch.equal(leaves_of(rebuilt)[k], v) for k, v in leaves_of(params).items())
    assert all(v.requires_grad == leaves_of(rebuilt)[k].requires_grad for k, v in leaves_of(params).items())


def test_the_base_model_is_outside_the_module_tree(model):
    module = lf.Adapted(model, lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS))
    assert module.model is model
    assert list(module.children()) == [] and list(module.modules()) == [module]
    base_ids = {id(p) for p in model.parameters()}
    assert not base_ids & {id(p) for p in module.parameters()}
    assert all(not k.startswith("model.") for k in module.state_dict())
    assert len(module.state_dict()) == sum(len(lv) for bv in module.params.values() for lv in bv.values())
    was = model.training
    module.train()
    module.eval()
    assert model.training == was  # train()/eval() do not reach the base
    with pytest.raises(AttributeError, match="fixed at construction"):
        module.model = copy.deepcopy(model)


def test_forward_is_lf_call_and_gradients_reach_only_the_parameters(model):
    params = moved(lf.init(0, model, lf.DoRAConfig(r=4), targets=TARGETS))
    module = lf.Adapted(model, params)
    x = tokens(2, 6)
    out = module(x, labels=x)
    assert torch.equal(out.logits, lf.call(model, params, x, labels=x).logits)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(b.grad is None for b in module.buffers())
    assert all(p.grad is None for p in model.parameters())
    assert all(v.grad is None for v in lf.trainable(params))  # the module holds copies: params untouched


def test_leaves_are_copies_and_training_leaves_params_and_model_alone(model):
    params = moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS))
    kept = {k: v.clone() for k, v in leaves_of(params).items()}
    base = {k: v.clone() for k, v in model.state_dict().items()}
    module = lf.Adapted(model, params)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    x = tokens(4, 8)
    for _ in range(3):
        loss = module(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, kept[k]) for k, v in leaves_of(params).items())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    changed = [k for k, v in leaves_of(module.params).items() if not torch.equal(v, kept[k])]
    assert changed and all(module.params[p][n][leaf].requires_grad for p, n, leaf in changed)


def test_state_dict_holds_the_adapter_leaves_and_loads_back_exactly(model, tmp_path):
    cfg = lf.AntiPaSTOConfig(r=8, block_size=4)
    trained = lf.Adapted(model, moved(lf.init(0, model, cfg, targets=TARGETS), seed=3))
    fresh = lf.Adapted(model, lf.init(1, model, cfg, targets=TARGETS))
    sd = trained.state_dict()
    assert set(sd) == set(trained.tree_keys)
    fresh.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(leaves_of(fresh.params).values(), leaves_of(trained.params).values()))
    torch.save(sd, tmp_path / "sd.pt")
    again = lf.Adapted(model, lf.init(2, model, cfg, targets=TARGETS))
    again.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = tokens(2, 6)
    assert torch.equal(again(x).logits, trained(x).logits)
    # a lite_fn checkpoint of .params loads back to the same tree
    lf.save(tmp_path / "a.safetensors", trained.params, config=cfg)
    loaded = lf.load(tmp_path / "a.safetensors", model=model)
    assert all(torch.equal(loaded[p][n][k], v) for (p, n, k), v in leaves_of(trained.params).items())


def test_to_moves_every_adapter_leaf_and_never_the_base(model):
    module = lf.Adapted(model, lf.init(0, model, lf.PiSSAConfig(r=4), targets=TARGETS))
    module.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in leaves_of(module.params).values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        isinstance(module.params[p][n][k], nn.Parameter) == lf.trees.is_trainable(n, k) for p, n, k in leaves_of(module.params)
    )


def test_forward_shows_the_model_signature(model):
    module = lf.Adapted(model, lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS))
    names = list(inspect.signature(module.forward).parameters)
    assert names == list(inspect.signature(model.forward).parameters)
    assert "input_ids" in names and "labels" in names
    assert type(module).__name__ == f"Adapted[{type(model).__name__}]"
    assert type(lf.Adapted(model, module.params)) is type(module)  # one facade class per model class
    assert module.loss_type == model.loss_type and module.accepts_loss_kwargs


def test_routes_stateless_bases_and_call_keywords_pass_through(model):
    adapters = [moved(lf.init(k, model, lf.LoRAConfig(r=4), targets=TARGETS), seed=10 * k) for k in range(3)]
    stacked = lf.Adapted(model, lf.stack(adapters))
    x, route = tokens(4, 6), torch.tensor([2, 0, 1, 2])
    want = lf.call(model, lf.stack(adapters), x, route=route).logits
    assert torch.equal(stacked(x, route=route).logits, want)

    skeleton = copy.deepcopy(model).to("meta")
    weights = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    stateless = lf.Adapted(skeleton, adapters[0], base=weights)
    assert torch.equal(stateless(x).logits, lf.call(model, adapters[0], x).logits)


def test_names_are_unique_when_paths_collide_after_sanitising():
    net = nn.Module()
    net.a__b = nn.Module()
    net.a__b.c = nn.Linear(4, 4)
    net.a = nn.Module()
    net.a.b__c = nn.Linear(4, 4)
    params = lf.init(0, net, lf.LoRAConfig(r=2), targets=r"(a__b\.c|a\.b__c)$")
    module = lf.Adapted(net, params)
    assert len(set(module.tree_keys)) == len(module.tree_keys) == 6
    assert {key[0] for key in module.tree_keys.values()} == {"a__b.c", "a.b__c"}
    for name, key in module.tree_keys.items():
        assert torch.equal(getattr(module, name), leaves_of(params)[key])


def test_refuses_what_is_not_a_model_and_params():
    model = tiny("llama")
    with pytest.raises(TypeError, match="must be an nn.Module"):
        lf.Adapted(lambda x: x, {})
    with pytest.raises(TypeError, match="non-empty dict"):
        lf.Adapted(model, {})
    with pytest.raises(KeyError):
        lf.Adapted(model, {"model.layers.0.self_attn.q_proj": {"nope": {"A": torch.zeros(2, 2)}}})
    with pytest.raises(ValueError, match="exactly one variant"):
        lf.Adapted(model, {"model.layers.0.self_attn.q_proj": {}})


def test_trainer_trains_the_facade(model, tmp_path):
    """transformers.Trainer on CPU: the loss it logs is the model's own (labels pass through; the first
    logged loss is the loss at init on the whole dataset, one batch per step), it falls, the leaves
    change, and the base model is untouched."""
    import transformers

    x = tokens(8, 12, seed=5)

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return {"input_ids": x[i], "labels": x[i]}

    params = lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS)
    module = lf.Adapted(model, params)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        at_init = module(x, labels=x).loss.item()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(x),
        max_steps=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(model=module, args=args, train_dataset=Rows())
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    assert abs(logged[0] - at_init) <= 1e-4 * at_init, (logged[0], at_init)
    with torch.no_grad():
        after = module(x, labels=x).loss.item()
    assert after < at_init - 1e-3 and logged[-1] < logged[0]
    assert all(not torch.equal(a, b) for a, b in zip(module.parameters(), lf.trainable(params)))  # A and B moved
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_trainer_checkpoints_hold_only_the_adapter_leaves_and_resume(model, tmp_path):
    import transformers
    from safetensors.torch import load_file

    x = tokens(4, 8, seed=6)
    rows = [{"input_ids": r, "labels": r} for r in x]

    def trainer(module, steps, save):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=steps,
            learning_rate=1e-2,
            report_to=[],
            use_cpu=True,
            save_strategy="steps" if save else "no",
            save_steps=2,
            disable_tqdm=True,
        )
        return transformers.Trainer(model=module, args=args, train_dataset=rows)

    first = lf.Adapted(model, lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS))
    trainer(first, 2, save=True).train()
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert saved.keys() == first.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in first.state_dict().items())
    second = lf.Adapted(model, lf.init(1, model, lf.LoRAConfig(r=4), targets=TARGETS))
    trainer(second, 2, save=False).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert all(torch.equal(a, b) for a, b in zip(second.parameters(), first.parameters()))  # loaded, no step left


def test_deepcopy_and_pickle_rebuild_the_facade(model):
    import io

    module = lf.Adapted(model, moved(lf.init(0, model, lf.LoRAConfig(r=4), targets=TARGETS)))
    x = tokens(2, 6)
    copied = copy.deepcopy(module)
    assert type(copied) is type(module) and copied.model is not model
    assert torch.equal(copied(x).logits, module(x).logits)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(module) and loaded.tree_keys == module.tree_keys
    assert torch.equal(loaded(x).logits, module(x).logits)
