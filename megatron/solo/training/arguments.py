"""Command line of ``pretrain_solo.py``: Megatron-LM flag names → a validated ``TrainConfig``.

Each option is declared once, as a ``TrainConfig`` field made by :func:`option`: its type (the annotation;
``Literal`` gives the choices), default, argparse group, help text and per-value check. The parser
(:func:`build_parser`) and the dry-run view (:func:`describe`) are derived from the fields; the rules that
tie several options together live in ``TrainConfig._check_rules``. Every error is a ``ConfigError`` that
starts with the flag at fault (``--flag: reason``).

Everything that can be checked before a process group exists is checked here: ``TrainConfig`` on its own
(``--data-path`` is parsed once, into ``TrainConfig.blend``), then :func:`resolve_layout` against a world size
and :func:`check_model` against the architecture (``ModelConfig.validate_parallel``). ``--dry-run`` runs
exactly these checks.
"""

from __future__ import annotations

import argparse
import functools
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import Field, dataclass, field, fields
from typing import Any, Literal, Union

from megatron.solo.config import ModelConfig
from megatron.solo.families import PRESETS


class ConfigError(ValueError):
    """A configuration mistake; the message starts with the flag at fault."""


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{flag}: {message}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# Declaring an option

Check = Callable[[Any], "str | None"]  # a value → why it is wrong, or None; never called with None


def option(
    default: Any = None,
    *,
    group: str,
    help: str | None = None,
    check: Check | None = None,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A ``TrainConfig`` field and its command line.

    ``group``: the ``--help`` section; ``check``: the per-value rule (skipped for None, "not given");
    ``choices``: when the annotation is not a ``Literal``; ``flag``: when it is not ``--field-name`` (a
    ``True`` boolean's ``--no-…``).
    """
    meta = {"group": group, "help": help, "check": check, "choices": choices, "flag": flag, "metavar": metavar}
    return field(default=default, metadata=meta)


def at_least(low: int | float, note: str = "") -> Check:
    return lambda v: None if v >= low else f"must be ≥ {low}{note}, got {v}"


def positive(v) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def below_one(v) -> str | None:
    return None if 0 <= v < 1 else f"must lie in [0, 1), got {v}"


def parse_data_path(values: Sequence[str]) -> list[tuple[float, str]]:
    """Megatron-LM ``--data-path`` syntax: a single prefix ``P``, or ``W1 P1 W2 P2 …``.

    Returns [(weight, prefix)] with the weights normalised to sum 1: the one place they are normalised (the
    loader's ``BlendedPackDataset`` takes them as they come).
    """
    values = list(values)
    if not values:
        raise ConfigError("--data-path: no prefix given")
    if len(values) == 1:
        return [(1.0, values[0])]
    if len(values) % 2:
        raise ConfigError(
            f"--data-path: expected a single prefix or weight/prefix pairs, got {len(values)} values {values}"
        )
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


# ---------------------------------------------------------------------------------------------
# The options


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Every option of a training run; field names are Megatron-LM's argument names."""

    # parallelism
    tensor_model_parallel_size: int = option(1, group="parallelism", check=at_least(1))
    pipeline_model_parallel_size: int = option(1, group="parallelism", check=at_least(1))
    sequence_parallel: bool = option(False, group="parallelism")
    use_distributed_optimizer: bool = option(
        False, group="parallelism", help="shard optimizer state over data-parallel ranks (ZeRO-1)"
    )
    distributed_timeout_minutes: float = option(10.0, group="parallelism")
    # model
    model_preset: str | None = option(
        group="model", choices=sorted(PRESETS), help="architecture for a run from scratch (otherwise read from --load)"
    )
    transformer_impl: Literal["auto", "local", "transformer_engine"] = option(
        "auto",
        group="model",
        help="transformer_engine: THD packed attention with cu_seqlens (GPU); local: megatron-core's "
        "modules with a block-diagonal mask (CPU, tests); auto: TE when CUDA and TE are present",
    )
    bf16: bool = option(False, group="model", help="bf16 weights and activations, fp32 main params and grads")
    recompute_granularity: Literal["full", "selective"] | None = option(group="model")
    recompute_method: Literal["uniform", "block"] | None = option(group="model")
    recompute_num_layers: int | None = option(group="model", check=at_least(1))
    freeze_language_model: bool = option(
        False, group="model", help="train only the patch projection (a warm-up before stage 1)"
    )
    distill_teacher: str | None = option(
        group="model",
        help="HaploVL stage 1: a local HF CLIP directory, the frozen vision teacher; the run then distils the "
        "pre-decoder (teacher at image patches, the LLM's frozen embeddings at text) instead of the LM loss",
    )
    distill_teacher_layer: int = option(
        -1, group="model", help="stage 1: the teacher's hidden layer giving the targets (HF hidden_states index)"
    )
    distill_head: Literal["linear", "mlp"] = option("linear", group="model", help="stage 1: form of both heads")
    tokenizer_model: str | None = option(
        group="model",
        help="SoloTokenizer (tokenizer.model or a directory) saved with the checkpoints; default: the one in --load",
    )
    # data
    data_path: tuple[str, ...] = option(
        (),
        group="data",
        metavar="W P",
        help="preprocessed prefixes: PREFIX, or W1 PREFIX1 W2 PREFIX2 ... (weights need not sum to 1)",
    )
    seq_length: int = option(4096, group="data", check=at_least(1))
    micro_batch_size: int = option(1, group="data", check=at_least(1))
    global_batch_size: int | None = option(
        group="data", check=at_least(1), help="default: micro-batch size × data-parallel size"
    )
    num_workers: int = option(2, group="data", check=at_least(0), help="data loader worker processes per rank")
    seed: int = option(1234, group="data")
    # optimisation
    train_iters: int = option(0, group="optimisation", check=at_least(0))
    lr: float = option(1e-4, group="optimisation", check=positive)
    min_lr: float = option(0.0, group="optimisation")
    decoupled_lr: float | None = option(
        group="optimisation",
        check=positive,
        help="learning rate of the input embedding and output layer (default: --lr); they learn new words fastest",
    )
    decoupled_min_lr: float | None = option(group="optimisation", help="their --min-lr (default: --min-lr)")
    lr_decay_style: Literal["cosine", "linear", "constant"] = option("cosine", group="optimisation")
    lr_warmup_iters: int = option(0, group="optimisation", check=at_least(0))
    lr_decay_iters: int | None = option(group="optimisation", check=at_least(1), help="default: --train-iters")
    weight_decay: float = option(
        0.01, group="optimisation", check=at_least(0), help="on ≥2-D weights; never on norms and biases"
    )
    clip_grad: float = option(
        1.0, group="optimisation", check=at_least(0, " (0 disables)"), help="global gradient-norm clip (0: off)"
    )
    adam_beta1: float = option(0.9, group="optimisation", check=below_one)
    adam_beta2: float = option(0.999, group="optimisation", check=below_one)
    adam_eps: float = option(1e-8, group="optimisation", check=positive)
    loss_averaging: Literal["token", "sample"] = option(
        "token",
        group="optimisation",
        help="token: one mean over the global batch's target tokens; sample: each sample's mean, then their mean "
        "(SOLO's SFT recipe), exact under packing and any parallel layout",
    )
    # checkpoints
    save: str | None = option(
        group="checkpoints", help="checkpoint root; a run finding a checkpoint here resumes from it"
    )
    save_interval: int | None = option(group="checkpoints", check=at_least(1))
    load: str | None = option(
        group="checkpoints", help="checkpoint root to start from (a converted release, or a previous stage)"
    )
    finetune: bool = option(
        False,
        group="checkpoints",
        help="take only the weights from --load: iteration 0, fresh optimizer, schedule and data order",
    )
    no_load_optim: bool = option(False, group="checkpoints")
    no_load_rng: bool = option(False, group="checkpoints")
    override_opt_param_scheduler: bool = option(
        False,
        group="checkpoints",
        help="on resume, use the flags' schedule instead of the checkpoint's (keeping its step)",
    )
    no_verify_checkpoint: bool = option(
        False, group="checkpoints", help="load without checking the checkpoint's files against their checksums"
    )
    exit_signal_handler: bool = option(
        True, group="checkpoints", flag="--no-exit-signal-handler", help="do not save and exit on SIGTERM/SIGINT"
    )
    exit_interval: int | None = option(
        group="checkpoints", check=at_least(1), help="save and exit at the first iteration divisible by this"
    )
    exit_duration_in_mins: float | None = option(group="checkpoints", help="save and exit after this much wall time")
    # logging
    log_interval: int = option(100, group="logging", check=at_least(1))
    tensorboard_dir: str | None = option(group="logging")
    wandb_project: str | None = option(group="logging")
    wandb_exp_name: str | None = option(group="logging")
    wandb_save_dir: str | None = option(group="logging")
    metrics_file: str | None = option(group="logging", help="append one JSON line of metrics per logged iteration")
    peak_tflops: float | None = option(
        group="logging", help="per-device peak dense TFLOP/s for the MFU estimate (default: known GPUs; none on CPU)"
    )
    # tooling
    dry_run: bool = option(
        False,
        group="tooling",
        help="validate the configuration, print it resolved (name: value) and exit; no GPU needed",
    )
    world_size: int | None = option(
        group="tooling", check=at_least(1), help="world size for --dry-run (default: $WORLD_SIZE or 1)"
    )

    # --data-path parsed once, at construction: [(weight normalised to sum 1, prefix)]; () without data
    blend: tuple[tuple[float, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in options():
            _check_value(f, getattr(self, f.name))
        object.__setattr__(self, "blend", tuple(parse_data_path(self.data_path)) if self.data_path else ())
        self._check_rules()

    def _check_rules(self) -> None:
        """The rules between options; each error names the flag to change."""
        _require(0 <= self.min_lr <= self.lr, "--min-lr", f"{self.min_lr} must lie in [0, --lr={self.lr}]")
        _require(
            self.decoupled_min_lr is None
            or (self.decoupled_lr is not None and 0 <= self.decoupled_min_lr <= self.decoupled_lr),
            "--decoupled-min-lr",
            f"{self.decoupled_min_lr} needs --decoupled-lr and must lie in [0, it]",
        )
        _require(
            self.lr_warmup_iters <= self.decay_iters or self.train_iters == 0,
            "--lr-warmup-iters",
            f"{self.lr_warmup_iters} exceeds --lr-decay-iters/--train-iters={self.decay_iters}",
        )
        _require(
            bool(self.data_path) or self.train_iters == 0 or self.dry_run,
            "--data-path",
            "required to train (Megatron-LM syntax: PREFIX, or W1 PREFIX1 W2 PREFIX2 ...)",
        )
        _require(
            self.model_preset is not None or self.load is not None or self.save is not None,
            "--model-preset",
            "give --model-preset or --load (where the architecture comes from)",
        )
        _require(not self.finetune or self.load is not None, "--finetune", "needs --load")
        _require(self.save_interval is None or self.save is not None, "--save-interval", "needs --save")
        _require(
            self.recompute_granularity != "full" or self.recompute_method is not None,
            "--recompute-method",
            "required with --recompute-granularity full (uniform or block)",
        )
        _require(
            self.recompute_method is None or self.recompute_granularity == "full",
            "--recompute-method",
            "only applies to --recompute-granularity full",
        )
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel",
            "needs --tensor-model-parallel-size > 1",
        )
        _require(
            self.transformer_impl != "transformer_engine" or self.bf16,
            "--transformer-impl",
            "transformer_engine's packed (THD) attention has no fp32 kernel: add --bf16 or use "
            "--transformer-impl local",
        )

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def backend(self) -> Literal["auto", "local", "te"]:
        return {"auto": "auto", "local": "local", "transformer_engine": "te"}[self.transformer_impl]

    def to_dict(self) -> dict:
        """The options as given (``blend`` is derived from ``data_path``)."""
        return {f.name: getattr(self, f.name) for f in options()}


def options() -> tuple[Field, ...]:
    """``TrainConfig``'s options (its fields that are flags), in ``--help`` order."""
    return tuple(f for f in fields(TrainConfig) if f.init)


def option_flag(f: Field) -> str:
    return f.metadata["flag"] or _flag(f.name)


def option_type(f: Field) -> tuple[type, tuple | None]:
    """(the value type argparse converts to, the choices) from the field's annotation and metadata."""
    hint = _type_hints()[f.name]
    if typing.get_origin(hint) in (Union, types.UnionType):  # X | None: None means "not given"
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], f.metadata["choices"]
    return hint, f.metadata["choices"]


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_value(f: Field, value: Any) -> None:
    if value is None:
        return
    _, choices = option_type(f)
    if choices is not None and value not in choices:
        raise ConfigError(f"{option_flag(f)}: unknown {value!r}; choose from {', '.join(map(str, choices))}")
    reason = f.metadata["check"](value) if f.metadata["check"] else None
    if reason:
        raise ConfigError(f"{option_flag(f)}: {reason}")


# ---------------------------------------------------------------------------------------------
# Layout and architecture checks


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
    _require(
        world_size % (tp * pp) == 0,
        "--tensor-model-parallel-size",
        f"TP×PP = {tp}×{pp} does not divide the world size {world_size}",
    )
    dp = world_size // (tp * pp)
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    _require(
        gbs % (cfg.micro_batch_size * dp) == 0,
        "--global-batch-size",
        f"{gbs} is not a multiple of --micro-batch-size × data-parallel size = {cfg.micro_batch_size}×{dp}",
    )
    return Layout(world_size, dp, gbs, gbs // (cfg.micro_batch_size * dp))


def check_model(cfg: TrainConfig, model: ModelConfig, padded_vocab_size: int) -> None:
    """The architecture against the layout and sequence length (errors name the flag)."""
    try:
        model.validate_parallel(
            tensor_parallel=cfg.tensor_model_parallel_size,
            pipeline_parallel=cfg.pipeline_model_parallel_size,
            sequence_parallel=cfg.sequence_parallel,
            seq_length=cfg.seq_length,
        )
    except ValueError as err:
        field_name, _, message = str(err).partition(": ")
        raise ConfigError(f"{_flag(field_name)}: {message}") from None
    _require(
        model.family != "haplo" or cfg.transformer_impl != "transformer_engine",
        "--transformer-impl",
        "HaploVL's mask (bidirectional inside images) is not expressible as Transformer Engine's THD "
        "attention; use local (auto picks it for HaploVL)",
    )
    _require(
        padded_vocab_size % cfg.tensor_model_parallel_size == 0,
        "--tensor-model-parallel-size",
        f"{cfg.tensor_model_parallel_size} does not divide the checkpoint's padded vocabulary {padded_vocab_size}",
    )
    pp = cfg.pipeline_model_parallel_size
    if cfg.distill_teacher is not None and model.family == "haplo":  # stage 1 splits the pre-decoder instead
        try:
            model.pre_decoder.validate_parallel(pipeline_parallel=pp)
        except ValueError as err:
            raise ConfigError(f"--pipeline-model-parallel-size: {err}") from None
    if cfg.recompute_num_layers is not None:
        per_stage = model.num_layers // cfg.pipeline_model_parallel_size
        _require(
            cfg.recompute_num_layers <= per_stage,
            "--recompute-num-layers",
            f"{cfg.recompute_num_layers} exceeds the {per_stage} layers of a pipeline stage",
        )


# ---------------------------------------------------------------------------------------------
# argparse, derived from the options


def build_parser() -> argparse.ArgumentParser:
    """One argument per option, in its group, in field order."""
    p = argparse.ArgumentParser(
        prog="pretrain_solo.py",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Pre-train a SOLO model (launch with torchrun; flags follow Megatron-LM).",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in options():
        name = f.metadata["group"]
        if name not in groups:
            groups[name] = p.add_argument_group(name)
        groups[name].add_argument(option_flag(f), dest=f.name, help=f.metadata["help"], **_argparse_kwargs(f))
    return p


def _argparse_kwargs(f: Field) -> dict[str, Any]:
    value_type, choices = option_type(f)
    if value_type is bool:  # a switch: it turns the default over
        return {"action": "store_false" if f.default else "store_true"}
    kwargs: dict[str, Any] = {"type": value_type, "default": f.default}
    if typing.get_origin(_type_hints()[f.name]) is tuple:
        kwargs.update(nargs="+", default=list(f.default))
    if choices is not None:
        kwargs["choices"] = list(choices)
    if f.metadata["metavar"]:
        kwargs["metavar"] = f.metadata["metavar"]
    return kwargs


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags → ``TrainConfig``; a ``ConfigError`` becomes argparse's usage error (exit status 2)."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    values["data_path"] = tuple(values["data_path"])
    try:
        return TrainConfig(**values)
    except ConfigError as err:
        parser.error(str(err))


# ---------------------------------------------------------------------------------------------
# The dry-run view, derived from the options


def describe(cfg: TrainConfig, layout: Layout, model: ModelConfig, padded_vocab_size: int) -> list[str]:
    """The resolved configuration, one ``name: value`` per line with Megatron-LM argument names: every option
    in field order (``data_path`` as its normalised blend), then what the layout and the model resolve."""
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
        "num_parameters": model.num_parameters()
        + (padded_vocab_size - model.padded_vocab_size()) * 2 * model.hidden_size,
    }
    values = {f.name: getattr(cfg, f.name) for f in options() if f.name not in derived}
    if cfg.blend:
        values["data_path"] = " ".join(f"{w:.4f} {p}" for w, p in cfg.blend)
    values.update(derived)
    return [f"{name}: {value}" for name, value in values.items()]
