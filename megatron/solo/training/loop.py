"""The training loop of ``pretrain_solo.py``: set up, step, log, checkpoint, stop cleanly.

Each iteration runs megatron-core's schedule over ``num_microbatches`` micro-batches per data-parallel rank,
checks the loss is finite on every rank *before* the optimizer steps (a NaN never reaches the weights), then
steps the optimizer and the LR schedule. SIGTERM/SIGINT (a preempted job) saves at the end of the current
iteration and exits 0; so do ``--exit-interval`` and ``--exit-duration-in-mins``.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron.solo import faults
from megatron.solo.backend import install_cpu_backend_if_needed
from megatron.solo.backend.mcore_fixes import own_checkpoint_writer_queue
from megatron.solo.checkpointing import CheckpointMetadata, NonFiniteParametersError
from megatron.solo.checksums import ChecksumError
from megatron.solo.model import sample_weights
from megatron.solo.parallel import init_distributed, initialize_model_parallel
from megatron.solo.tokenizer import SoloTokenizer, has_tokenizer
from megatron.solo.training.arguments import ConfigError, Layout, TrainConfig, check_model, parse_args, resolve_layout
from megatron.solo.training.build import Components, build_components
from megatron.solo.training.checkpoint import (
    Start,
    TrainingState,
    load_training_checkpoint,
    resolve_start,
    save_training_checkpoint,
)
from megatron.solo.training.dataset import BlendedPackDataset, build_train_loader
from megatron.solo.training.metrics import (
    LOSS_KEYS,
    MetricSinks,
    Window,
    default_peak_tflops,
    head_weights,
    loss_with_breakdown,
    micro_batch_work,
    stage1_micro_batch_work,
    sum_micro_batches,
)
from megatron.solo.training.stage1 import Stage1Teacher

# Mistral's EOS, the reference's pad. Padding is its own attention span and never a target, so the id only
# has to exist; the tokenizer's own pad id wins when the run knows its tokenizer.
DEFAULT_PAD_ID = 2


class NonFiniteLossError(RuntimeError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    install_cpu_backend_if_needed()  # a no-op on GPUs
    try:
        if cfg.dry_run:
            from megatron.solo.training.dry_run import dry_run

            return dry_run(cfg)
        return Trainer(cfg).run()
    except (ConfigError, FileNotFoundError) as err:  # a flag, or a path a flag names
        print(f"pretrain_solo.py: error: {err}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, NonFiniteParametersError) as err:
        print(f"pretrain_solo.py: {err}", file=sys.stderr)
        return 3
    except ChecksumError as err:
        print(f"pretrain_solo.py: error: {err}", file=sys.stderr)
        return 4


class Trainer:
    """One rank's view of a run."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        init_distributed(timeout_s=cfg.distributed_timeout_minutes * 60)
        if cfg.save:
            own_checkpoint_writer_queue()  # its helper process must die with this one
        self.layout: Layout = resolve_layout(cfg, dist.get_world_size())
        self.start: Start = resolve_start(cfg)
        check_model(cfg, self.start.model, self.start.padded_vocab_size)
        initialize_model_parallel(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, seed=cfg.seed)
        self.sinks = MetricSinks(cfg, enabled=_is_logging_rank())
        self.tokenizer = _resolve_tokenizer(cfg, self.start)
        # Data before the model: a wrong --data-path fails in seconds, not after building 7B parameters.
        self.dataset = (
            BlendedPackDataset(
                list(cfg.blend),
                num_samples=max(cfg.train_iters, 1) * self.layout.global_batch_size,
                seed=cfg.seed,
                decode_patches=parallel_state.is_pipeline_first_stage(),
                tokenizer=self.tokenizer.fingerprint() if self.tokenizer is not None else None,
                # the teacher runs where the stage-1 loss is: the last pipeline stage
                teacher_inputs=cfg.distill_teacher is not None and parallel_state.is_pipeline_last_stage(),
            )
            if cfg.blend
            else None
        )
        if self.dataset is not None:
            _check_pack_lengths(self.dataset, cfg.seq_length)
            _check_image_layout(self.dataset, self.start.model)
        self.teacher = None
        if cfg.distill_teacher is not None:
            Stage1Teacher.check(cfg, self.start.model)  # on every rank: a bad flag stops them all alike
            if parallel_state.is_pipeline_last_stage():  # the teacher (memory) only where the loss is
                self.teacher = Stage1Teacher(cfg, self.start.model)
        self.parts: Components = build_components(
            cfg,
            self.start.model,
            self.start.padded_vocab_size,
            teacher_hidden_size=self.teacher.hidden_size if self.teacher is not None else None,
        )
        has_heads = self.teacher is not None  # the last pipeline stage of stage 1
        self.stage1_heads = head_weights(self.parts.model.distill_heads) if has_heads else (0, 0)
        self.metadata = CheckpointMetadata(self.start.model, self.start.padded_vocab_size)
        self.state = TrainingState()
        if self.start.kind != "scratch":
            self.state = load_training_checkpoint(
                self.start, cfg, model=self.parts.model, optimizer=self.parts.optimizer, scheduler=self.parts.scheduler
            )
        self.stop_requested = False
        self.peak_tflops = cfg.peak_tflops or default_peak_tflops()

    # -- set-up helpers ---------------------------------------------------------------------------

    def _announce(self) -> None:
        cfg, layout = self.cfg, self.layout
        self.sinks.message(
            f"SOLO pre-training: {self.start.description}; world {layout.world_size} = "
            f"TP {cfg.tensor_model_parallel_size} × PP {cfg.pipeline_model_parallel_size} × "
            f"DP {layout.data_parallel_size}; global batch "
            f"{layout.global_batch_size} × {cfg.seq_length} tokens ({layout.num_microbatches} micro-batches of "
            f"{cfg.micro_batch_size}); iteration {self.state.iteration}/{cfg.train_iters}"
        )
        if self.dataset is not None:
            for line in self.dataset.describe():
                self.sinks.message(f"  data: {line}")

    def _install_signal_handlers(self) -> None:
        if not self.cfg.exit_signal_handler:
            return

        def request_stop(signum, _frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _batches(self) -> Iterator:
        return iter(
            build_train_loader(
                self.dataset,
                seq_length=self.cfg.seq_length,
                micro_batch_size=self.cfg.micro_batch_size,
                data_parallel_rank=parallel_state.get_data_parallel_rank(),
                data_parallel_size=self.layout.data_parallel_size,
                consumed_samples=self.state.consumed_samples,
                num_workers=self.cfg.num_workers,
                pad_id=self.pad_id,
                patch_dim=self.start.model.patch_dim,
            )
        )

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else DEFAULT_PAD_ID

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> int:
        cfg = self.cfg
        self._announce()
        if cfg.save and self.tokenizer is not None and dist.get_rank() == 0:
            self.tokenizer.save_pretrained(cfg.save)  # before any tracker file names a checkpoint here
        self._install_signal_handlers()
        batches = self._batches() if self.dataset is not None and self.state.iteration < cfg.train_iters else None
        window, started = Window(), time.monotonic()
        # Resuming this run's own checkpoint: that iteration is saved already (a finished run re-submitted
        # must not rewrite it).
        resumed_here = self.start.kind == "resume" and self.start.root == cfg.save
        saved_at = self.state.iteration if resumed_here else None
        while self.state.iteration < cfg.train_iters:
            t0 = time.monotonic()
            reduced, grad_norm = self.train_step(batches)
            self.state.iteration += 1
            self.state.consumed_samples += self.layout.global_batch_size
            window.add(reduced, time.monotonic() - t0, grad_norm)
            it = self.state.iteration
            if it % cfg.log_interval == 0 or it == cfg.train_iters:
                self._log(window)
                window = Window()
            saved_at = self._maybe_save(saved_at)
            faults.kill_at("train.kill_at_iteration", it)  # tests only: the job dies here, no clean-up at all
            reason = self._exit_reason(started)
            if reason:
                self.sinks.message(f"stopping after iteration {it}: {reason}")
                if cfg.save and saved_at != it:
                    self.save()
                self.sinks.close()
                return 0
        if cfg.save and saved_at != self.state.iteration:
            self.save()
        self.sinks.close()
        return 0

    def train_step(self, batches: Iterator | None) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over the global batch → ([keys, 2] sums reduced over DP, grad norm)."""
        parts, cfg, layout = self.parts, self.cfg, self.layout
        parts.ddp.zero_grad_buffer()
        parts.optimizer.zero_grad()
        seq_length, micro_batch_size = parts.model.pipeline_shape(cfg.micro_batch_size, cfg.seq_length)
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=batches,
            model=[parts.ddp],
            num_microbatches=layout.num_microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=False,
            **parts.model.pipeline_schedule_kwargs(),  # HaploVL stage 1: pre-decoder-width p2p tensors
        )
        reduced = self._reduce(outputs)
        self._check_finite(reduced)
        _, grad_norm, _ = parts.optimizer.step()
        parts.scheduler.step(increment=1)
        return reduced, grad_norm

    def _forward_step(self, data_iterator, model):
        try:
            batch = next(data_iterator)
        except StopIteration:
            raise RuntimeError("the data loader ran out before --train-iters (a bug: it is sized to the run)") from None
        image_rows = batch.image_rows()  # rows holding patches, from patch_index (complete on every stage)
        # per-sample weights on the host too: documents are spans of cu_seqlens; TP ranks compute the same
        weights, samples = sample_weights(batch.loss_mask, batch.cu_seqlens)
        weights = weights if self.cfg.loss_averaging == "sample" else None
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        if self.cfg.distill_teacher is not None:
            return self._distillation_step(batch, model, image_rows, samples, device)
        work = micro_batch_work(batch, self.start.model, self.start.padded_vocab_size)  # host: no device sync
        # uint8 patches cross to the device (a quarter of float32's bytes) and are normalised there
        batch = batch.to(device, non_blocking=True).normalized(self.dataset.image_config)
        out = model(
            batch.tokens,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.patches,
            batch.patch_index,
            labels=batch.labels,
            loss_mask=batch.loss_mask,
            image_block_ids=batch.image_block_ids,  # HaploVL's mask and position table (SOLO ignores them)
            patch_table_index=batch.patch_table_index,
        )
        return out, partial(
            loss_with_breakdown,
            batch.loss_mask,
            image_rows.to(device, non_blocking=True),
            work.to(device, non_blocking=True),
            samples.to(device, non_blocking=True),
            weights=None if weights is None else weights.to(device, non_blocking=True),
        )

    def _distillation_step(self, batch, model, image_rows, samples, device):
        """HaploVL stage 1: the teacher's features at the patches, the distillation loss per token; its
        "lm loss" is the mean over distilled positions (every patch and every real text token). Under pipeline
        parallelism only the last stage has the teacher (and its inputs); the others run the pre-decoder."""
        distill_mask, positions = Stage1Teacher.masks(batch)  # host: text positions; all distilled positions
        # FLOPs of what runs (the frozen LLM does not); only the last stage's count is used (it has the heads)
        work = stage1_micro_batch_work(
            batch, distill_mask, self.start.model, self.start.padded_vocab_size, self.stage1_heads
        )
        batch = batch.to(device, non_blocking=True).normalized(self.dataset.image_config)
        out = model(
            batch.tokens,
            batch.position_ids,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.patches,
            batch.patch_index,
            image_block_ids=batch.image_block_ids,
            patch_table_index=batch.patch_table_index,
            teacher_features=self.teacher.targets(batch) if self.teacher is not None else None,
            distill_mask=distill_mask.to(device, non_blocking=True),
        )
        positions = positions.to(device, non_blocking=True)
        return out, partial(
            loss_with_breakdown,
            positions,
            image_rows.to(device, non_blocking=True),
            work.to(device, non_blocking=True),
            samples.to(device, non_blocking=True),
        )

    def _reduce(self, outputs) -> torch.Tensor:
        """Sum the loss pairs over micro-batches (last stage) and data-parallel ranks; zeros elsewhere."""
        if not parallel_state.is_pipeline_last_stage():
            return torch.zeros(len(LOSS_KEYS) + 2, 2)
        sums = sum_micro_batches(outputs)
        if torch.cuda.is_available():
            sums = sums.cuda()
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        return sums.cpu()

    def _check_finite(self, reduced: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(reduced[0, 0]) else 1.0])
        if torch.cuda.is_available():
            bad = bad.cuda()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank learns it, before any of them steps
        if bad.item():
            last = "none yet" if not self.cfg.save else f"the latest in {self.cfg.save}"
            raise NonFiniteLossError(
                f"iteration {self.state.iteration + 1}: the loss is not finite; stopped before the optimizer step "
                f"(weights untouched; checkpoint: {last}). Lower --lr, check --clip-grad, or inspect the "
                f"samples after consumed sample {self.state.consumed_samples}."
            )

    def _main_lr(self) -> float:
        """The current --lr (not --decoupled-lr's embedding/output groups)."""
        groups = self.parts.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("max_lr") == self.cfg.lr), groups[0]["lr"])

    def _log(self, window: Window) -> None:
        if not self.sinks.enabled:
            return
        metrics = window.summary(
            iteration=self.state.iteration,
            consumed_samples=self.state.consumed_samples,
            lr=self._main_lr(),
            tokens_per_iteration=self.layout.global_batch_size * self.cfg.seq_length,
            world_size=self.layout.world_size,
            peak_tflops=self.peak_tflops,
        )
        self.sinks.log(metrics, self.cfg.train_iters)

    def _maybe_save(self, saved_at: int | None) -> int | None:
        it = self.state.iteration
        if self.cfg.save and self.cfg.save_interval and it % self.cfg.save_interval == 0:
            self.save()
            return it
        return saved_at

    def save(self) -> None:
        t0 = time.monotonic()
        path = save_training_checkpoint(
            self.cfg.save,
            self.state,
            model=self.parts.model,
            optimizer=self.parts.optimizer,
            scheduler=self.parts.scheduler,
            metadata=self.metadata,
            cfg=self.cfg,
        )
        self.sinks.message(f"saved {path} in {time.monotonic() - t0:.1f} s")

    def _exit_reason(self, started: float) -> str | None:
        cfg = self.cfg
        flags = torch.tensor(
            [
                float(self.stop_requested),
                float(
                    cfg.exit_duration_in_mins is not None
                    and time.monotonic() - started > 60 * cfg.exit_duration_in_mins
                ),
            ]
        )
        if torch.cuda.is_available():
            flags = flags.cuda()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # one rank's signal stops all of them at the same step
        if flags[0].item():
            return "termination signal"
        if flags[1].item():
            return f"--exit-duration-in-mins {cfg.exit_duration_in_mins}"
        if cfg.exit_interval and self.state.iteration % cfg.exit_interval == 0:
            return f"--exit-interval {cfg.exit_interval}"
        return None


def _is_logging_rank() -> bool:
    """The rank that sees the reduced loss: last pipeline stage, first tensor and data-parallel rank."""
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def _check_pack_lengths(dataset: BlendedPackDataset, seq_length: int) -> None:
    """Every pack fits ``--seq-length``: checked when the data is opened, before the model is built (the
    loader would find out only when the first batch is asked for)."""
    for prefix, longest in zip(dataset.prefixes, dataset.max_pack_length()):
        if longest > seq_length:
            raise ConfigError(
                f"--seq-length: {seq_length} is shorter than the packs of --data-path prefix "
                f"{prefix!r} (up to {longest} tokens): preprocess it for this sequence length, "
                f"or raise --seq-length"
            )


def _check_image_layout(dataset: BlendedPackDataset, model) -> None:
    """Every prefix lays its images out as the model's family reads them (its header's ``layout``) and was
    patchified at the model's patch size: a SOLO prefix never trains a HaploVL model, nor the other way."""
    for ds in dataset.datasets:
        layout, patch = ds.header["layout"], ds.image_config.patch_size  # read_header fills in older headers
        if layout != model.family or patch != model.patch_size:
            raise ConfigError(
                f"--data-path: prefix {ds.prefix!r} holds {layout!r} images of {patch}-px patches, but the model "
                f"({model.family}) reads {model.family!r} images of {model.patch_size}-px patches: preprocess it "
                f"with --image-layout {model.family}"
            )


def _resolve_tokenizer(cfg: TrainConfig, start: Start) -> SoloTokenizer | None:
    """``--tokenizer-model``, else the starting checkpoint's; saved with every checkpoint of the run."""
    if cfg.tokenizer_model is not None:
        tokenizer = SoloTokenizer(cfg.tokenizer_model)
    elif start.root is not None and has_tokenizer(start.root):
        tokenizer = SoloTokenizer.from_pretrained(start.root)
    else:
        return None
    if tokenizer.vocab_size != start.model.vocab_size:
        raise ConfigError(
            f"--tokenizer-model: {tokenizer.vocab_size} tokens, but the model has vocab_size={start.model.vocab_size}"
        )
    return tokenizer
