"""Each module README lists as "copies out alone" works as one file in an empty folder, with lorakit not importable.

For every such module: the AST shows no import of lorakit (absolute or relative) beyond the companions README names
(data.py goes with records.py); the file, copied with its companions into an empty temporary folder, imports in a
fresh `python -I` whose import system refuses lorakit, runs its docstring doctests (if any) and a small example from
the table below; and README's copy-out table names exactly the third-party packages the module imports.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorakit"
TINY = ROOT / "data" / "tiny"  # a tokenizer with a chat template, read as data (no lorakit code comes with it)

# module: an example that imports the module as a top-level name and exercises its main functions; None means the
# module docstring's indented example is complete as written, and that is what runs.
EXAMPLES = {
    "lora": """
        import torch
        from torch import nn
        from lora import add_lora, count_parameters, lora_state_dict, merge_lora
        torch.manual_seed(0)
        model = nn.Sequential()
        model.add_module("q_proj", nn.Linear(16, 16))
        model.add_module("v_proj", nn.Linear(16, 16))
        assert add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8) == ["q_proj", "v_proj"]
        assert count_parameters(model)[0] == 2 * 4 * (16 + 16)
        x = torch.randn(3, 16)
        model(x).pow(2).sum().backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        before = model(x)
        merge_lora(model)
        assert torch.allclose(model(x), before, atol=1e-5) and len(lora_state_dict(model)) == 4
    """,
    "nf4": """
        import torch
        from nf4 import bits_per_param, dequantize_nf4, quantize_nf4
        torch.manual_seed(0)
        w = torch.randn(64, 128)
        packed, state = quantize_nf4(w)
        w_hat = dequantize_nf4(packed, state)
        assert w_hat.shape == w.shape and packed.numel() == w.numel() // 2
        assert ((w - w_hat).norm() / w.norm()).item() < 0.15
        assert abs(bits_per_param() - 4.127) < 1e-3
    """,
    "data": f"""
        import json
        from types import SimpleNamespace
        from transformers import AutoTokenizer
        from data import IGNORE_INDEX, DataError, load_records, make_supervised_data_module
        good = {{"conversations": [{{"from": "human", "value": "reverse: ab"}}, {{"from": "gpt", "value": "ba"}}]}}
        with open("train.jsonl", "w") as f:
            f.write(json.dumps(good) + "\\n" + json.dumps(good) + "\\n")
        assert len(load_records("train.jsonl")) == 2
        with open("bad.jsonl", "w") as f:
            f.write(json.dumps(good) + "\\n" + '{{"conversations": []}}' + "\\n")
        try:
            load_records("bad.jsonl")
            raise SystemExit("a record without turns was accepted")
        except DataError as error:
            assert "bad.jsonl:2" in str(error), error
        tokenizer = AutoTokenizer.from_pretrained({str(TINY)!r})
        module = make_supervised_data_module(tokenizer, SimpleNamespace(
            data_path="train.jsonl", eval_data_path="", lazy_preprocess=False))
        batch = module["data_collator"]([module["train_dataset"][0], module["train_dataset"][1]])
        labels = batch["labels"][0]
        assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()
    """,
    "records": """
        from records import DataError, check_record
        good = {"conversations": [{"from": "human", "value": "reverse: ab"}, {"from": "gpt", "value": "ba"}]}
        assert check_record(good, "x") == [{"role": "user", "content": "reverse: ab"},
                                           {"role": "assistant", "content": "ba"}]
        bad = {"conversations": [{"from": "bot", "value": "x"}]}
        error = None
        try:
            check_record(bad, "train.jsonl:7")
        except DataError as raised:
            error = str(raised)
        assert error and error.startswith("train.jsonl:7: turn 0 has unknown role"), error
    """,
    "args": """
        from transformers import HfArgumentParser
        from args import DataArguments, LoraArguments, ModelArguments, TrainingArguments
        parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
        model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses(
            ["--output_dir", "out", "--lora_r", "4", "--use_cpu", "True"])
        assert lora_args.lora_r == 4 and training_args.learning_rate == 3e-3
        try:
            LoraArguments(lora_r=0)
            raise SystemExit("lora_r=0 was accepted")
        except ValueError as error:
            assert "--lora_r" in str(error)
    """,
    "attention": """
        import torch
        import torch.nn.functional as F
        from attention import register, tiled_attention
        torch.manual_seed(0)
        q, k, v = torch.randn(1, 4, 50, 16), torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        assert (tiled_attention(q, k, v, block=16) - expected).abs().max().item() < 1e-5
        assert register() == "lorakit_tiled"
    """,
    "meter": None,
    "memory": None,
    "runs": """
        from runs import MARKER, RunDirError, open_run
        run = open_run("out", settings={"--learning_rate": 3e-3})
        assert (run.output_dir / MARKER).is_file() and run.resume_from is None
        assert open_run("out", settings={"--learning_rate": 3e-3}).run_id == run.run_id
        try:
            open_run("out", settings={"--learning_rate": 1e-3})
            raise SystemExit("a run with another learning rate was accepted")
        except RunDirError as error:
            assert "--learning_rate" in str(error)
    """,
    "zero3": """
        import torch
        from torch import nn
        from peft import LoraConfig, PeftModel, get_peft_model
        from zero3 import adapter_parameter_names, save_adapter
        names = [("q_proj.lora_A.default.weight", None), ("q_proj.base_layer.bias", None), ("k_proj.bias", None)]
        assert adapter_parameter_names(names, "lora_only") == [n for n, _ in names[:2]]
        def base():  # the same base weights every time
            torch.manual_seed(0)
            model = nn.Sequential()
            model.add_module("q_proj", nn.Linear(8, 8))
            return model
        model = get_peft_model(base(), LoraConfig(r=2, target_modules=["q_proj"]))
        nn.init.normal_(model.base_model.model.q_proj.lora_B.default.weight)
        save_adapter(model, "adapter")
        x = torch.randn(2, 8)
        assert torch.equal(PeftModel.from_pretrained(base(), "adapter")(x), model(x))
    """,
}

# module -> the lorakit modules copied with it (README's table says so); it imports them by their own names there
WITH = {"data": ("records",)}

# The prelude of every subprocess: the copied file's folder (the working directory) first on sys.path, and an import
# hook that refuses lorakit, which the editable install would otherwise find from anywhere.
PRELUDE = """
import sys
class NoLorakit:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "lorakit" or name.startswith("lorakit."):
            raise ModuleNotFoundError(f"No module named {name!r} (a module copied out alone must not import lorakit)")
        return None
sys.meta_path.insert(0, NoLorakit)
sys.path.insert(0, "")
try:
    import lorakit
    raise SystemExit("lorakit is importable: the isolation failed")
except ModuleNotFoundError:
    pass
import doctest
import MODULE
failed, _ = doctest.testmod(MODULE)
assert failed == 0, "docstring doctests failed"
"""


def imports(module: str) -> tuple[set[str], set[str]]:
    """(packages imported when the module is imported, packages imported only inside its functions): top-level names,
    stdlib, __future__ and the module's companions (WITH) left out, a relative import shown as '.'."""
    at_import, in_functions = set(), set()
    companions = {name for c in WITH.get(module, ()) for name in (c, f"lorakit.{c}")}

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found = {alias.name.split(".")[0] for alias in child.names}
            elif isinstance(child, ast.ImportFrom) and child.module in companions:
                continue  # `from lorakit.records import ...`, or `from records import ...` once copied out
            elif isinstance(child, ast.ImportFrom):
                found = {"." if child.level else child.module.split(".")[0]}
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
                continue
            (in_functions if in_function else at_import).update(found)

    visit(ast.parse((PACKAGE / f"{module}.py").read_text()), False)
    skip = set(sys.stdlib_module_names) | {"__future__"}
    return at_import - skip, in_functions - at_import - skip


def docstring_example(module: str) -> str:
    """The first indented block of the module docstring, dedented."""
    doc = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text()), clean=False)
    block = re.search(r"\n\n((?:    .*\n)+)", doc + "\n").group(1)
    return textwrap.dedent(block)


def readme_table() -> dict[str, tuple[str, str]]:
    """README's copy-out table: module -> (needed to import, needed by some functions)."""
    rows = re.findall(r"^\| `(\w+)\.py` \| ([^|]*) \| ([^|]*) \|", (ROOT / "README.md").read_text(), re.M)
    return {name: (needed.strip(), lazy.strip()) for name, needed, lazy in rows}


def listed(packages: set[str]) -> str:
    return ", ".join(sorted(packages)) or "—"


@pytest.mark.parametrize("module", EXAMPLES)
def test_imports_no_lorakit(module):
    top, lazy = imports(module)
    assert not {"lorakit", "."} & (top | lazy), f"lorakit/{module}.py imports lorakit: it would not copy out alone"


@pytest.mark.parametrize("module", EXAMPLES)
def test_readme_lists_its_third_party_imports(module):
    top, lazy = imports(module)
    assert readme_table().get(module) == (listed(top), listed(lazy)), (
        f"README's copy-out table should have the row | `{module}.py` | {listed(top)} | {listed(lazy)} |")


def test_readme_lists_no_other_module():
    assert set(readme_table()) == set(EXAMPLES)


@pytest.mark.parametrize("module", EXAMPLES)
def test_runs_copied_alone(module, tmp_path):
    for name in (module, *WITH.get(module, ())):
        shutil.copy(PACKAGE / f"{name}.py", tmp_path)
    example = EXAMPLES[module] or docstring_example(module).replace(f"lorakit.{module}", module)  # as copied
    code = PRELUDE.replace("MODULE", module) + textwrap.dedent(example)
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"lorakit/{module}.py copied alone:\n{result.stderr[-3000:]}"
