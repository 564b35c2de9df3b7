"""Command line of ``pretrain_solo.py``: Megatron-LM flag names → a validated ``TrainConfig``.

Everything that can be checked before a process group exists is checked here, with errors naming the flag:
``TrainConfig`` on its own, then :func:`resolve_layout` against a world size and :func:`check_model` against
the architecture (``ModelConfig.validate_parallel``). ``--dry-run`` runs exactly these checks.
"""

from __future__ import annotations

import argparse
import math
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Sequence

from megatron.solo.config import PRESETS, ModelConfig


class ConfigError(ValueError):
    """A configuration mistake; the message starts with the flag at fault."""


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{flag}: {message}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every option of a training run; field names are Megatron-LM's argument names."""

    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    distributed_timeout_minutes: float = 10.0
    # model
    model_preset: str | None = None
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    bf16: bool = False
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: int | None = None
    freeze_language_model: bool = False
    tokenizer_model: str | None = None
    # data
    data_path: tuple[str, ...] = ()
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    num_workers: int = 2
    seed: int = 1234
    # optimisation
    train_iters: int = 0
    lr: float = 1e-4
    min_lr: float = 0.0
    decoupled_lr: float | None = None
    decoupled_min_lr: float | None = None
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    loss_averaging: Literal["token", "sample"] = "token"
    # checkpoints
    save: str | None = None
    save_interval: int | None = None
    load: str | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    override_opt_param_scheduler: bool = False
    no_verify_checkpoint: bool = False
    exit_signal_handler: bool = True
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    # logging
    log_interval: int = 100
    tensorboard_dir: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    metrics_file: str | None = None
    peak_tflops: float | None = None
    # tooling
    dry_run: bool = False
    world_size: int | None = None
    kill_at_iteration: int | None = field(default=None, repr=False)  # fault injection for the resume tests

    def __post_init__(self) -> None:
        positive = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "seq_length", "micro_batch_size",
                    "log_interval")
        for name in positive:
            _require(getattr(self, name) >= 1, _flag(name), f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("global_batch_size", "save_interval", "recompute_num_layers", "exit_interval",
                     "lr_decay_iters", "world_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, _flag(name), f"must be ≥ 1, got {value}")
        for name in ("train_iters", "lr_warmup_iters", "num_workers"):
            _require(getattr(self, name) >= 0, _flag(name), f"must be ≥ 0, got {getattr(self, name)}")
        _require(self.lr > 0, "--lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr <= self.lr, "--min-lr", f"{self.min_lr} must lie in [0, --lr={self.lr}]")
        _require(self.decoupled_lr is None or self.decoupled_lr > 0, "--decoupled-lr",
                 f"must be positive, got {self.decoupled_lr}")
        _require(self.decoupled_min_lr is None or (self.decoupled_lr is not None
                                                   and 0 <= self.decoupled_min_lr <= self.decoupled_lr),
                 "--decoupled-min-lr", f"{self.decoupled_min_lr} needs --decoupled-lr and must lie in [0, it]")
        _require(self.weight_decay >= 0, "--weight-decay", f"must be ≥ 0, got {self.weight_decay}")
        _require(self.clip_grad >= 0, "--clip-grad", f"must be ≥ 0 (0 disables), got {self.clip_grad}")
        _require(0 <= self.adam_beta1 < 1, "--adam-beta1", f"must lie in [0, 1), got {self.adam_beta1}")
        _require(0 <= self.adam_beta2 < 1, "--adam-beta2", f"must lie in [0, 1), got {self.adam_beta2}")
        _require(self.adam_eps > 0, "--adam-eps", f"must be positive, got {self.adam_eps}")
        _require(self.loss_averaging in ("token", "sample"), "--loss-averaging", f"token or sample, got {self.loss_averaging!r}")
        _require(self.lr_warmup_iters <= self.decay_iters or self.train_iters == 0, "--lr-warmup-iters",
                 f"{self.lr_warmup_iters} exceeds --lr-decay-iters/--train-iters={self.decay_iters}")
        _require(bool(self.data_path) or self.train_iters == 0 or self.dry_run, "--data-path",
                 "required to train (Megatron-LM syntax: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...)")
        _require(self.model_preset is None or self.model_preset in PRESETS, "--model-preset",
                 f"unknown {self.model_preset!r}; choose from {', '.join(sorted(PRESETS))}")
        _require(self.model_preset is not None or self.load is not None or self.save is not None, "--model-preset",
                 "give --model-preset or --load (where the architecture comes from)")
        _require(not self.finetune or self.load is not None, "--finetune", "needs --load")
        _require(self.save_interval is None or self.save is not None, "--save-interval", "needs --save")
        _require(self.recompute_granularity != "full" or self.recompute_method is not None, "--recompute-method",
                 "required with --recompute-granularity full (uniform or block)")
        _require(self.recompute_method is None or self.recompute_granularity == "full", "--recompute-method",
                 "only applies to --recompute-granularity full")
        _require(not self.sequence_parallel or self.tensor_model_parallel_size > 1, "--sequence-parallel",
                 "needs --tensor-model-parallel-size > 1")
        _require(self.transformer_impl != "transformer_engine" or self.bf16, "--transformer-impl",
                 "transformer_engine's packed (THD) attention has no fp32 kernel: add --bf16 or use "
                 "--transformer-impl local")

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def backend(self) -> Literal["auto", "local", "te"]:
        return {"auto": "auto", "local": "local", "transformer_engine": "te"}[self.transformer_impl]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    """How a ``TrainConfig`` spreads over ``world_size`` ranks."""

    world_size: int
    data_parallel_size: int
    global_batch_size: int
    num_microbatches: int


def resolve_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """Data-parallel size and micro-batches per step; ``ConfigError`` naming the flag when inconsistent."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    _require(world_size % (tp * pp) == 0, "--tensor-model-parallel-size",
             f"TP×PP = {tp}×{pp} does not divide the world size {world_size}")
    dp = world_size // (tp * pp)
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    _require(gbs % (cfg.micro_batch_size * dp) == 0, "--global-batch-size",
             f"{gbs} is not a multiple of --micro-batch-size × data-parallel size = {cfg.micro_batch_size}×{dp}")
    return Layout(world_size, dp, gbs, gbs // (cfg.micro_batch_size * dp))


def check_model(cfg: TrainConfig, model: ModelConfig, padded_vocab_size: int) -> None:
    """The architecture against the layout and sequence length (errors name the flag)."""
    try:
        model.validate_parallel(tensor_parallel=cfg.tensor_model_parallel_size,
                                pipeline_parallel=cfg.pipeline_model_parallel_size,
                                sequence_parallel=cfg.sequence_parallel, seq_length=cfg.seq_length)
    except ValueError as err:
        field_name, _, message = str(err).partition(": ")
        raise ConfigError(f"{_flag(field_name)}: {message}") from None
    _require(padded_vocab_size % cfg.tensor_model_parallel_size == 0, "--tensor-model-parallel-size",
             f"{cfg.tensor_model_parallel_size} does not divide the checkpoint's padded vocabulary "
             f"{padded_vocab_size}")
    if cfg.recompute_num_layers is not None:
        per_stage = model.num_layers // cfg.pipeline_model_parallel_size
        _require(cfg.recompute_num_layers <= per_stage, "--recompute-num-layers",
                 f"{cfg.recompute_num_layers} exceeds the {per_stage} layers of a pipeline stage")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# argparse


def build_parser() -> argparse.ArgumentParser:
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(TrainConfig)})  # one home for defaults
    p = argparse.ArgumentParser(
        prog="pretrain_solo.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pre-train a SOLO model (launch with torchrun; flags follow Megatron-LM).")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=d.tensor_model_parallel_size)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=d.pipeline_model_parallel_size)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=d.distributed_timeout_minutes)

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(PRESETS),
                   help="architecture for a run from scratch (otherwise read from --load)")
    g.add_argument("--transformer-impl", choices=["auto", "local", "transformer_engine"], default=d.transformer_impl,
                   help="transformer_engine: THD packed attention with cu_seqlens (GPU); local: megatron-core's "
                        "modules with a block-diagonal mask (CPU, tests); auto: TE when CUDA and TE are present")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations, fp32 main params and grads")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--recompute-method", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int)
    g.add_argument("--freeze-language-model", action="store_true",
                   help="train only the patch projection (a warm-up before stage 1)")
    g.add_argument("--tokenizer-model", help="SoloTokenizer (tokenizer.model or a directory) saved with the "
                                             "checkpoints; default: the one in --load")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], metavar="W P",
                   help="preprocessed prefixes: PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (weights need not sum to 1)")
    g.add_argument("--seq-length", type=int, default=d.seq_length)
    g.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    g.add_argument("--global-batch-size", type=int, help="default: micro-batch size × data-parallel size")
    g.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader worker processes per rank")
    g.add_argument("--seed", type=int, default=d.seed)

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-iters", type=int, default=d.train_iters)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr", type=float, default=d.min_lr)
    g.add_argument("--decoupled-lr", type=float, help="learning rate of the input embedding and output layer "
                   "(default: --lr); they learn new words fastest")
    g.add_argument("--decoupled-min-lr", type=float, help="their --min-lr (default: --min-lr)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default=d.lr_decay_style)
    g.add_argument("--lr-warmup-iters", type=int, default=d.lr_warmup_iters)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="on ≥2-D weights; never on norms and biases")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="global gradient-norm clip (0: off)")
    g.add_argument("--adam-beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=d.adam_eps)
    g.add_argument("--loss-averaging", choices=["token", "sample"], default=d.loss_averaging,
                   help="token: one mean over the global batch's target tokens; sample: each sample's mean, then "
                        "their mean (SOLO's SFT recipe), exact under packing and any parallel layout")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", help="checkpoint root; a run finding a checkpoint here resumes from it")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--load", help="checkpoint root to start from (a converted release, or a previous stage)")
    g.add_argument("--finetune", action="store_true",
                   help="take only the weights from --load: iteration 0, fresh optimizer, schedule and data order")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, use the flags' schedule instead of the checkpoint's (keeping its step)")
    g.add_argument("--no-verify-checkpoint", action="store_true",
                   help="load without checking the checkpoint's files against their checksums")
    g.add_argument("--no-exit-signal-handler", dest="exit_signal_handler", action="store_false",
                   help="do not save and exit on SIGTERM/SIGINT")
    g.add_argument("--exit-interval", type=int, help="save and exit at the first iteration divisible by this")
    g.add_argument("--exit-duration-in-mins", type=float, help="save and exit after this much wall time")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=d.log_interval)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--wandb-project")
    g.add_argument("--wandb-exp-name")
    g.add_argument("--wandb-save-dir")
    g.add_argument("--metrics-file", help="append one JSON line of metrics per logged iteration")
    g.add_argument("--peak-tflops", type=float, help="per-device peak dense TFLOP/s for the MFU estimate "
                                                     "(default: known GPUs; none on CPU)")

    g = p.add_argument_group("tooling")
    g.add_argument("--dry-run", action="store_true",
                   help="validate the configuration, print it resolved (name: value) and exit; no GPU needed")
    g.add_argument("--world-size", type=int, help="world size for --dry-run (default: $WORLD_SIZE or 1)")
    g.add_argument("--kill-at-iteration", type=int, help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags → ``TrainConfig``; a ``ConfigError`` becomes argparse's usage error (exit status 2)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    values = vars(ns)
    values["data_path"] = tuple(values["data_path"])
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        parser.error(str(err))


def parse_data_path(values: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron-LM ``--data-path`` syntax: a single prefix ``P``, or ``W1 P1 W2 P2 …``.

    Returns [(weight, prefix)] with the weights normalised to sum 1.
    """
    values = list(values)
    if not values:
        raise ConfigError("--data-path: no prefix given")
    if len(values) == 1:
        return [(1.0, values[0])]
    if len(values) % 2:
        raise ConfigError(f"--data-path: expected a single prefix or weight/prefix pairs, got {len(values)} values "
                         f"{values}")
    blend = []
    for raw, prefix in zip(values[::2], values[1::2]):
        try:
            weight = float(raw)
        except ValueError:
            raise ConfigError(f"--data-path: weight {raw!r} (before {prefix!r}) is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"--data-path: weight {raw!r} of {prefix!r} must be a positive number")
        if prefix in (p for _, p in blend):
            raise ConfigError(f"--data-path: prefix {prefix!r} is given twice")
        blend.append((weight, prefix))
    total = sum(w for w, _ in blend)
    return [(w / total, p) for w, p in blend]


def describe(cfg: TrainConfig, layout: Layout, model: ModelConfig, padded_vocab_size: int) -> list[str]:
    """The resolved configuration, one ``name: value`` per line with Megatron-LM argument names."""
    derived = {
        "world_size": layout.world_size,
        "data_parallel_size": layout.data_parallel_size,
        "global_batch_size": layout.global_batch_size,
        "num_microbatches": layout.num_microbatches,
        "lr_decay_iters": cfg.decay_iters,
        "train_samples": cfg.train_iters * layout.global_batch_size,
        "tokens_per_iteration": layout.global_batch_size * cfg.seq_length,
        "num_layers": model.num_layers,
        "hidden_size": model.hidden_size,
        "ffn_hidden_size": model.ffn_hidden_size,
        "num_attention_heads": model.num_attention_heads,
        "num_query_groups": model.num_query_groups,
        "kv_channels": model.head_dim,
        "max_position_embeddings": model.max_sequence_length,
        "rotary_base": model.rotary_base,
        "norm_epsilon": model.norm_epsilon,
        "sliding_window_size": model.sliding_window,
        "vision_patch_size": model.patch_size,
        "vocab_size": model.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "num_parameters": model.num_parameters() + (padded_vocab_size - model.padded_vocab_size()) * 2 * model.hidden_size,
    }
    values = {k: v for k, v in cfg.to_dict().items() if k not in derived and k != "kill_at_iteration"}
    if cfg.data_path:
        values["data_path"] = " ".join(f"{w:.4f} {p}" for w, p in parse_data_path(cfg.data_path))
    values.update(derived)
    return [f"{name}: {value}" for name, value in values.items()]
