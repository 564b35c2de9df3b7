"""Model set-up pieces of the trainer, in-process."""

import pytest

from megatron.solo.config import get_preset
from megatron.solo.model import build_model, make_transformer_config
from megatron.solo.training.build import freeze_language_model


def test_freezing_the_language_model_leaves_only_the_patch_projection_trainable(megatron_world):
    cfg = get_preset("tiny")
    model = build_model(cfg, make_transformer_config(cfg))
    freeze_language_model(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["patch_embedding.weight"]
    assert sum(1 for _ in model.parameters()) > 10  # the decoder is there, frozen


def test_fused_cpu_adam_makes_the_same_update_as_the_default_loop(megatron_world):
    import torch

    from megatron.solo.backend.cpu import use_fused_cpu_adam
    from megatron.solo.training.arguments import TrainConfig
    from megatron.solo.training.build import build_components

    cfg = get_preset("tiny").replace(vocab_size=300)
    train = TrainConfig(model_preset="tiny", train_iters=0, lr=1e-3, decoupled_lr=5e-3)
    parts = build_components(train, cfg, cfg.padded_vocab_size())
    inner = (
        parts.optimizer.chained_optimizers[0].optimizer
        if hasattr(parts.optimizer, "chained_optimizers")
        else parts.optimizer.optimizer
    )
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    assert {g["max_lr"] for g in inner.param_groups} == {1e-3, 5e-3}  # --decoupled-lr: its own groups

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, 8, generator=generator)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    default = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)

    class Wrapper:  # the shape of a megatron optimizer: .optimizer is the torch one
        optimizer = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)

    use_fused_cpu_adam(Wrapper)
    for _ in range(3):
        grads = [torch.randn(50, 8, generator=generator) for _ in params]
        for p, c, g in zip(params, copies, grads):
            p.grad, c.grad = g, g.clone()
        default.step()
        Wrapper.optimizer.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(c, p, rtol=1e-6, atol=1e-7)


def test_adam_state_initialisation_touches_torch_adam_only():
    """The zero state megatron-core needs before loading into torch's Adam would break TE's FusedAdam."""
    import torch

    from megatron.solo.backend.mcore_fixes import init_torch_optimizer_state

    class FusedAdamLike(torch.optim.Optimizer):  # TE's/Apex's FusedAdam: a plain Optimizer, not torch's Adam
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

    class Wrapper:
        def __init__(self, inner):
            self.optimizer = inner

    torch_adam = Wrapper(torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))]))
    fused = Wrapper(FusedAdamLike([torch.nn.Parameter(torch.ones(3))]))
    init_torch_optimizer_state(torch_adam)
    init_torch_optimizer_state(fused)
    (state,) = torch_adam.optimizer.state.values()
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert not fused.optimizer.state  # untouched


def _inner_groups(optimizer) -> list[dict]:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [g for opt in chained for g in opt.optimizer.param_groups]


def test_stage1_logit_scale_gets_no_weight_decay_and_weights_do(megatron_world):
    """A 0-d parameter (the CTP loss's learned temperature) is excluded like norms and biases (CLIP's recipe)."""
    from megatron.solo.families import get_preset as family_preset
    from megatron.solo.training.arguments import TrainConfig
    from megatron.solo.training.build import build_components

    cfg = family_preset("haplo-tiny")
    train = TrainConfig(model_preset="haplo-tiny", train_iters=0, weight_decay=0.1, distill_teacher="unused")
    parts = build_components(train, cfg, cfg.padded_vocab_size(), teacher_hidden_size=24)
    named = dict(parts.model.named_parameters())
    scale = named["distill_heads.log_logit_scale"]
    assert scale.dim() == 0 and scale.requires_grad
    decay = {id(p): g["weight_decay"] for g in _inner_groups(parts.optimizer) for p in g["params"]}
    assert decay[id(scale)] == 0.0
    weights = [p for name, p in named.items() if p.requires_grad and p.dim() == 2]
    assert weights and all(decay[id(p)] == 0.1 for p in weights)
    norms = [p for name, p in named.items() if p.requires_grad and p.dim() == 1]
    assert norms and all(decay[id(p)] == 0.0 for p in norms)


@pytest.mark.parametrize("preset", ["tiny", "haplo-tiny"])
def test_models_without_0d_parameters_keep_megatron_cores_weight_decay_groups(megatron_world, preset):
    """For SOLO (and HaploVL's stage 2) the rule is megatron-core's default one, parameter by parameter."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from megatron.solo.families import build_model as build_family_model
    from megatron.solo.families import get_preset as family_preset
    from megatron.solo.training.build import weight_decay_overrides

    cfg = family_preset(preset)
    model = build_family_model(cfg, make_transformer_config(cfg), padded_vocab_size=cfg.padded_vocab_size())
    config = OptimizerConfig(lr=1e-3, weight_decay=0.1, decoupled_lr=5e-3)

    def groups(overrides) -> dict[int, tuple]:
        found = _get_param_groups([model], config, overrides)
        return {id(p): (g["wd_mult"], g["max_lr"]) for g in found for p in g["params"]}

    ours, default = groups(weight_decay_overrides(config)), groups(None)
    assert ours == default
    assert {wd for wd, _ in default.values()} == {0.0, 1.0}  # both kinds are there
    assert {lr for _, lr in default.values()} == {1e-3, 5e-3}  # --decoupled-lr's groups are kept
