#!/usr/bin/env python
"""The HaploVL CPU miniature's steps (examples/haplo/demo.sh): its teacher, its start, its evaluation.

    python tools/haplo_demo.py teacher --labels RAW/labels --out TEACHER [--steps 300]
    python tools/haplo_demo.py start --out START [--tokenizer-model M] [--seed 1234]
    python tools/haplo_demo.py llm --out LLM [--tokenizer-model M] [--seed 1234]
    python tools/haplo_demo.py evaluate --questions RAW/sft/heldout.jsonl --image-root RAW/captions \
        --run "with stage 1" CKPT METRICS --run "without stage 1" CKPT METRICS --out OUT [--timings FILE]

``teacher``: a tiny CLIP vision tower trained on the label images (``megatron.solo.demo.teacher``), saved with
``save_pretrained``. ``start``: haplo-tiny at random (the tokenizer's vocabulary), saved as a release
checkpoint with its tokenizer: stage 1 and the no-stage-1 baseline both start from it. ``llm``: a random
HF Mistral at haplo-tiny's LLM geometry (with the tokenizer), the stand-in for a pre-trained LLM that
``tools/convert_checkpoint.py haplo-init`` turns into a start (``START_INIT=haplo-init`` in demo.sh).
``evaluate``: every held-out question of each run answered by ranking its candidate answers by log-likelihood
(``megatron.solo.demo.likelihood``); writes ``OUT/report.md`` (printed), ``OUT/report.json``,
``OUT/answers_<i>.jsonl`` (each question, answer and candidate scores of run ``i``) and ``OUT/loss_curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("teacher", help="train and save the tiny CLIP teacher")
    t.add_argument("--labels", required=True, type=Path, help="the demo's labels/ (train/<wnid>/, classes.txt)")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--tile-size", type=int, default=56, help="the model's tile side in pixels (haplo-tiny: 56)")
    s = sub.add_parser("start", help="haplo-tiny at random, saved as a release checkpoint")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--tokenizer-model", default=None, help="default: the bundled Mistral tokenizer")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--preset", default="haplo-tiny")
    m = sub.add_parser("llm", help="a random HF Mistral at haplo-tiny's LLM geometry, for haplo-init")
    m.add_argument("--out", required=True, type=Path)
    m.add_argument("--tokenizer-model", default=None, help="default: the bundled Mistral tokenizer")
    m.add_argument("--seed", type=int, default=1234)
    m.add_argument("--preset", default="haplo-tiny")
    e = sub.add_parser("evaluate", help="held-out short answers of each run, side by side")
    e.add_argument("--questions", required=True, type=Path, help="held-out questions {image, kind, question, answer}")
    e.add_argument("--image-root", required=True, type=Path, help="the questions' images are relative to it")
    e.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "CKPT", "METRICS"))
    e.add_argument("--timings", type=Path, default=None, help="'step seconds' lines to report")
    e.add_argument("--out", required=True, type=Path)
    return p.parse_args(argv)


def make_start(out: Path, tokenizer_model: str | None, seed: int, preset: str = "haplo-tiny") -> None:
    """``preset`` at random with the tokenizer's vocabulary, saved (with the tokenizer) as iteration 0."""
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.checkpointing import CheckpointMetadata, save_model
    from megatron.solo.families import build_model, get_preset
    from megatron.solo.model import make_transformer_config
    from megatron.solo.parallel import ensure_model_parallel_of_one, tensor_parallel_seed
    from megatron.solo.tokenizer import SoloTokenizer

    install_cpu_backend_if_needed()
    tokenizer = SoloTokenizer(tokenizer_model) if tokenizer_model else SoloTokenizer()
    cfg = get_preset(preset).replace(vocab_size=tokenizer.vocab_size)
    ensure_model_parallel_of_one()
    tensor_parallel_seed(seed)
    model = build_model(cfg, make_transformer_config(cfg), padded_vocab_size=cfg.padded_vocab_size(1))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    save_model(out, model, CheckpointMetadata(cfg, cfg.padded_vocab_size(1)))


def make_llm(out: Path, tokenizer_model: str | None, seed: int, preset: str = "haplo-tiny") -> None:
    """A randomly initialised HF ``MistralForCausalLM`` with ``preset``'s LLM geometry and the tokenizer's base
    vocabulary, saved with the tokenizer (``tokenizer.model``): what haplo-init reads as the LLM."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from megatron.solo.families import get_preset
    from megatron.solo.tokenizer import default_tokenizer_model

    cfg = get_preset(preset)
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=32000,  # the Mistral tokenizer's own ids; haplo-init adds SOLO's extra ones
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_sequence_length,
        rope_theta=cfg.rotary_base,
        rms_norm_eps=cfg.norm_epsilon,
        sliding_window=None,
        tie_word_embeddings=False,
    )
    MistralForCausalLM(config).save_pretrained(out)
    shutil.copyfile(tokenizer_model or default_tokenizer_model(), Path(out) / "tokenizer.model")


def evaluate_run(ckpt: str, questions: list[dict]) -> tuple[list[str], list[list[float]]]:
    """Each question's most likely candidate under checkpoint ``ckpt``, and every candidate's score."""
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.checkpointing import load_full_model
    from megatron.solo.data.encode import EncodeConfig
    from megatron.solo.demo.likelihood import CANDIDATES, rank_answers
    from megatron.solo.haplo.anyres import AnyresConfig
    from megatron.solo.tokenizer import SoloTokenizer

    install_cpu_backend_if_needed()
    model, metadata = load_full_model(ckpt)
    cfg = metadata.model
    if cfg.family != "haplo":
        raise ValueError(f"{ckpt}: a {cfg.family} checkpoint; this evaluator scores the HaploVL miniature")
    tiling = AnyresConfig(
        tile_size=cfg.tile_size,
        patch_size=cfg.patch_size,
        pinpoints=cfg.image_grid_pinpoints,
        anyres_max=cfg.anyres_max_tiles,
    )
    encode = EncodeConfig(layout="haplo", anyres=tiling)  # preprocessing's: same codec, template and EOS
    tokenizer = SoloTokenizer.from_pretrained(ckpt)
    answers, scores = [], []
    for q in questions:
        best, got = rank_answers(model, tokenizer, encode, q["image"], q["question"], CANDIDATES[q["kind"]])
        answers.append(best)
        scores.append(got)
    return answers, scores


def format_report(runs: list[dict], timings: dict[str, float]) -> str:
    """Markdown: the two runs side by side (held-out accuracy overall and per kind, stage-2 loss)."""
    from megatron.solo.demo.evaluate import _losses, _pct

    kinds = list(runs[0]["score"].by_kind)
    lines = [
        "# HaploVL CPU miniature: the stage-1 ablation",
        "",
        "Stage 2 (full fine-tuning on the SFT chats) from the same start, steps, data and seed, once after "
        "stage 1 (pre-decoder distillation) and once without. Held-out questions about unseen scenes, each "
        "answered by the candidate answer of highest log-likelihood.",
        "",
        "| run | held-out accuracy | " + " | ".join(kinds) + " | stage-2 loss (first → last logged) |",
        "|---|---|" + "---|" * len(kinds) + "---|",
    ]
    for run in runs:
        score = run["score"]
        per_kind = " | ".join(f"{_pct(score.by_kind[k])} ({score.n_by_kind[k]})" for k in kinds)
        lines.append(
            f"| {run['name']} | **{_pct(score.accuracy)}** of {score.n} | {per_kind} | {_losses(run['losses'])} |"
        )
    lines.append("")
    for run in runs:
        lines.append(f"{run['name']}, examples (question, truth, answer):")
        lines += [f"- {q!r}: {t!r} → {a!r}" for q, t, a in run["score"].examples[:4]]
        lines.append("")
    if timings:
        lines.append(
            "Wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
            + f"; total {sum(timings.values()) / 60:.1f} min."
        )
    return "\n".join(lines).rstrip()


def evaluate(args) -> int:
    from megatron.solo.backend import install_cpu_backend_if_needed
    from megatron.solo.data.workdir import write_atomic
    from megatron.solo.demo import evaluate as ev

    install_cpu_backend_if_needed()
    start = time.perf_counter()
    questions = ev.read_questions(args.questions, args.image_root)
    args.out.mkdir(parents=True, exist_ok=True)
    runs, curves = [], []
    for i, (name, ckpt, metrics_file) in enumerate(args.run):
        answers, scores = evaluate_run(ckpt, questions)
        rows = [{**q, "predicted": a, "scores": s} for q, a, s in zip(questions, answers, scores, strict=True)]
        write_atomic(str(args.out / f"answers_{i}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
        metrics = ev.read_metrics(metrics_file)
        runs.append(
            {"name": name, "ckpt": ckpt, "score": ev.score_chat(questions, answers), "losses": ev.loss_summary(metrics)}
        )
        curves.append((name, metrics))
    ev.plot_runs(curves, args.out / "loss_curves.png", "HaploVL CPU miniature: stage 2 with vs without stage 1")
    timings = ev.read_timings(args.timings) if args.timings else {}
    timings["evaluate"] = time.perf_counter() - start
    report = format_report(runs, timings)
    print(report)
    write_atomic(str(args.out / "report.md"), (report + "\n").encode())
    summary = {
        "runs": [
            {
                "name": r["name"],
                "checkpoint": r["ckpt"],
                "answers": f"answers_{i}.jsonl",
                "accuracy": r["score"].accuracy,
                "score": dataclasses.asdict(r["score"]),
                "losses": r["losses"],
            }
            for i, r in enumerate(runs)
        ],
        "timings": timings,
    }
    write_atomic(str(args.out / "report.json"), (json.dumps(summary, indent=2) + "\n").encode())
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "teacher":
        from megatron.solo.demo.teacher import TeacherConfig, train_teacher

        got = train_teacher(args.labels, args.out, TeacherConfig(image_size=args.tile_size, steps=args.steps))
        print(f"teacher: loss {got['first_loss']:.3f} → {got['last_loss']:.3f}, "
              f"training accuracy {100 * got['train_accuracy']:.1f}%, saved to {args.out}")  # fmt: skip
        return 0
    if args.command == "start":
        make_start(args.out, args.tokenizer_model, args.seed, args.preset)
        print(f"start: {args.preset} at random (seed {args.seed}) saved to {args.out}")
        return 0
    if args.command == "llm":
        make_llm(args.out, args.tokenizer_model, args.seed, args.preset)
        print(f"llm: a random HF Mistral at {args.preset}'s LLM geometry saved to {args.out}")
        return 0
    return evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
