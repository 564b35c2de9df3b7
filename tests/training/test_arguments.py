"""pretrain_solo.py's options: declared once (TrainConfig fields), the parser and the dry-run view derived."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from megatron.solo.config import get_preset
from megatron.solo.training.arguments import (
    ConfigError,
    Layout,
    TrainConfig,
    build_parser,
    describe,
    option_flag,
    options,
    parse_args,
)


def _parser_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in build_parser()._actions if a.dest != "help"}


def test_every_option_is_one_flag_with_the_fields_default_and_help():
    actions = _parser_actions()
    assert list(actions) == [f.name for f in options()]  # nothing else, in field order
    for f in options():
        action = actions[f.name]
        assert action.option_strings == [option_flag(f)]
        assert action.help == f.metadata["help"]
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        assert action.default == default, f.name
    assert parse_args(["--model-preset", "tiny"]) == TrainConfig(model_preset="tiny")


def test_choices_come_from_the_annotation_or_the_declaration():
    actions = _parser_actions()
    assert actions["transformer_impl"].choices == ["auto", "local", "transformer_engine"]
    assert actions["lr_decay_style"].choices == ["cosine", "linear", "constant"]
    assert actions["recompute_granularity"].choices == ["full", "selective"]
    assert "tiny" in actions["model_preset"].choices
    assert isinstance(actions["exit_signal_handler"], argparse._StoreFalseAction)
    assert actions["data_path"].nargs == "+" and actions["data_path"].metavar == "W P"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_length=0), "--seq-length: must be ≥ 1, got 0"),
        (dict(global_batch_size=0), "--global-batch-size: must be ≥ 1, got 0"),
        (dict(num_workers=-1), "--num-workers: must be ≥ 0, got -1"),
        (dict(lr=0.0), "--lr: must be positive, got 0.0"),
        (dict(clip_grad=-1.0), "--clip-grad: must be ≥ 0 (0 disables), got -1.0"),
        (dict(adam_beta2=1.0), "--adam-beta2: must lie in [0, 1), got 1.0"),
        (dict(model_preset="huge"), "--model-preset: unknown 'huge'; choose from"),
        (dict(transformer_impl="cuda"), "--transformer-impl: unknown 'cuda'"),
        (dict(min_lr=1.0), "--min-lr: 1.0 must lie in [0, --lr=0.0001]"),
        (dict(recompute_granularity="full"), "--recompute-method: required with --recompute-granularity full"),
        (dict(data_path=("1", "a", "b"), train_iters=1), "--data-path: expected a single prefix or weight/prefix"),
        (dict(train_iters=1), "--data-path: required to train"),
    ],
)
def test_errors_name_the_flag(kwargs, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{"model_preset": "tiny", **kwargs})
    assert str(err.value).startswith(message)


def test_a_bad_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--model-preset", "tiny", "--data-path", "0", "a", "--train-iters", "1"])
    assert exit_.value.code == 2
    assert "error: --data-path: weight '0' of 'a' must be a positive number" in capsys.readouterr().err


def test_data_path_is_parsed_once_into_the_normalised_blend():
    cfg = parse_args(["--model-preset", "tiny", "--data-path", "3", "/d/a", "1", "/d/b"])
    assert cfg.data_path == ("3", "/d/a", "1", "/d/b")  # as given: saved with checkpoints, shown to W&B
    assert cfg.blend == ((0.75, "/d/a"), (0.25, "/d/b"))
    assert "blend" not in cfg.to_dict()
    assert dataclasses.replace(cfg, data_path=("/d/c",)).blend == ((1.0, "/d/c"),)
    assert TrainConfig(model_preset="tiny").blend == ()


def test_describe_shows_every_option_once_and_the_blend_resolved():
    cfg = parse_args(["--model-preset", "tiny", "--data-path", "3", "/d/a", "1", "/d/b", "--train-iters", "5"])
    model = get_preset("tiny")
    lines = describe(cfg, Layout(2, 2, 2, 1), model, model.padded_vocab_size())
    names = [line.partition(": ")[0] for line in lines]
    assert len(names) == len(set(names))
    assert {f.name for f in options()} <= set(names)
    shown = dict(line.split(": ", 1) for line in lines)
    assert shown["data_path"] == "0.7500 /d/a 0.2500 /d/b"
    assert shown["world_size"] == "2" and shown["lr_decay_iters"] == "5"  # resolved, not the flags' None


def test_no_test_hook_in_the_production_configuration():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not any("kill" in name for name in names)
    with pytest.raises(SystemExit):
        parse_args(["--model-preset", "tiny", "--kill-at-iteration", "3"])
