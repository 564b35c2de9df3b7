"""Model set-up pieces of the trainer, in-process."""

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
