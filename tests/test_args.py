"""lorakit.args: the seed's flags parse, the defaults point at the embedded model and task, bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import HfArgumentParser

from lorakit.args import DataArguments, LoraArguments, ModelArguments, TrainingArguments

GROUPS = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)


def parse(*argv: str):
    return HfArgumentParser(GROUPS).parse_args_into_dataclasses(args=list(argv))


def test_defaults_need_only_output_dir(tmp_path):
    model_args, data_args, training_args, lora_args = parse("--output_dir", str(tmp_path))
    assert (Path(model_args.model_name_or_path) / "config.json").is_file()
    assert Path(data_args.data_path).is_file() and Path(data_args.eval_data_path).is_file()
    # the seed's LoRA and its extra training fields
    assert (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout) == (8, 16, 0.05)
    assert lora_args.lora_target_modules == ["q_proj", "v_proj"]
    assert (lora_args.lora_bias, lora_args.q_lora, lora_args.lora_weight_path) == ("none", False, "")
    assert (training_args.optim, training_args.model_max_length, training_args.flash_attn) == ("adamw_torch", 512, False)
    assert training_args.report_to == []


def test_seed_flags_parse(tmp_path):
    _, data_args, training_args, lora_args = parse(
        "--output_dir", str(tmp_path), "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.1",
        "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "--lora_bias", "lora_only",
        "--model_max_length", "128", "--learning_rate", "2e-5", "--lazy_preprocess", "True", "--flash_attn", "True")
    assert lora_args.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_bias) == (16, 32, 0.1,
                                                                                                     "lora_only")
    assert (training_args.model_max_length, training_args.learning_rate, training_args.flash_attn) == (128, 2e-5, True)
    assert data_args.lazy_preprocess is True


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_r": 0}, "--lora_r 0 must be a positive integer"),
    ({"lora_r": -4}, "--lora_r -4"),
    ({"lora_r": 2.5}, "--lora_r 2.5"),
    ({"lora_alpha": 0}, "--lora_alpha 0 must be > 0"),
    ({"lora_dropout": 1.0}, "--lora_dropout 1.0 must be in [0, 1)"),
    ({"lora_dropout": -0.1}, "--lora_dropout -0.1"),
    ({"lora_bias": "some"}, "--lora_bias 'some' is not one of none, all, lora_only"),
    ({"lora_target_modules": []}, "needs at least one non-empty layer name"),
    ({"lora_target_modules": ["q_proj", " "]}, "needs at least one non-empty layer name"),
    ({"lora_weight_path": "/nonexistent/adapter"}, "holds no adapter_config.json"),
])
def test_lora_arguments_reject(kwargs, message):
    with pytest.raises(ValueError) as error:
        LoraArguments(**kwargs)
    assert message in str(error.value)


def test_lora_target_modules_accepts_one_string():
    assert LoraArguments(lora_target_modules="q_proj").lora_target_modules == ["q_proj"]


@pytest.mark.parametrize("cls, kwargs, message", [
    (DataArguments, {"data_path": "train.csv"}, "--data_path 'train.csv' is neither .jsonl nor .json"),
    (DataArguments, {"eval_data_path": "eval.txt"}, "--eval_data_path 'eval.txt'"),
    (DataArguments, {"data_path": ""}, "--data_path is empty"),
    (ModelArguments, {"model_name_or_path": " "}, "--model_name_or_path is empty"),
    (TrainingArguments, {"output_dir": "x", "model_max_length": 1}, "--model_max_length 1 is too small"),
    (TrainingArguments, {"output_dir": "x", "learning_rate": 0.0}, "--learning_rate 0.0 must be > 0"),
])
def test_other_arguments_reject(cls, kwargs, message):
    with pytest.raises(ValueError) as error:
        cls(**kwargs)
    assert message in str(error.value)


def test_parser_reports_bad_value(tmp_path):
    with pytest.raises(ValueError, match="--lora_bias 'everything'"):
        parse("--output_dir", str(tmp_path), "--lora_bias", "everything")
