"""Course tooling: execute the notebooks, time them, build student copies, read inline code back out of them.

    python -m lorakit.course run [NOTEBOOK ...]   # re-execute top to bottom and save outputs   (make notebooks)
    python -m lorakit.course table                # execute headless, print notebook / seconds / status (make course)
    python -m lorakit.course student              # student copies without solutions or outputs  (make student)
    python -m lorakit.course warnings             # the PYTHONWARNINGS value for kernels (make lab, make notebooks)
"""

from __future__ import annotations

import argparse
import builtins
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.launch import LIBRARY_NOISE

if TYPE_CHECKING:  # nbformat comes with the course extra; imported where a notebook is read or written
    import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
STUDENT = ROOT / "student"
BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = 'raise NotImplementedError("your turn: write this part, then run the cell again")'

# The one list of library warnings the course hides (PYTHONWARNINGS syntax, action::Category:module, the module matched
# exactly): each was measured in the tests or the notebooks with no filter, and nobody running the course can act on
# it. A warning raised by your own code, or any other library warning, still shows. LIBRARY_NOISE (lorakit.launch) is
# what multi-process runs print: DeepSpeed's deprecated torch.distributed collectives, and transformers' v6 renames
# that peft and the Trainer still call. Added here: a notebook kernel without ipywidgets gets tqdm's "IProgress not
# found" (TqdmWarning) when the libraries import tqdm.auto, in every notebook; and torch's own mkldnn module calls the
# deprecated torch.jit.script_method at import (Python hides that one by default; pytest shows DeprecationWarnings).
QUIET = (
    *LIBRARY_NOISE,
    "ignore::Warning:tqdm.auto",
    "ignore::DeprecationWarning:torch.jit._script",
)


def warnings_env(current: str | None = None) -> str:
    """PYTHONWARNINGS for a kernel or subprocess: `current` (default: this environment's) followed by QUIET.

    Later entries win where both apply, so only QUIET's warnings are hidden and the user's own setting (say
    error::UserWarning) still holds for everything else.
    """
    current = os.environ.get("PYTHONWARNINGS", "") if current is None else current
    return ",".join(filter(None, [current, *(entry for entry in QUIET if entry not in current.split(","))]))


def quiet() -> None:
    """Apply QUIET in this process (a notebook kernel or script started without PYTHONWARNINGS from warnings_env)."""
    for entry in QUIET:
        action, message, category, module = (entry.split(":") + [""] * 4)[:4]
        warnings.filterwarnings(action, message, getattr(builtins, category), re.escape(module) + r"\Z")


def setup(seed: int = 0) -> str:
    """The first call of every notebook: the course's quiet, reproducible set-up in one place; returns the model name.

    QUIET's library warnings hidden (before the imports that raise them), bitsandbytes' optional-kernel notice and
    transformers' info logs and progress bars off, DeepSpeed told it is on CPU when there is no GPU (else it logs its
    accelerator guess at every import), torch seeded. The model is $LORAKIT_MODEL, else "tiny" (lorakit.models).
    """
    quiet()
    import logging

    import torch
    from transformers.utils import logging as hf_logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.manual_seed(seed)
    from lorakit.models import default_model

    return default_model()


def notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in its own folder, as JupyterLab would; returns it with outputs, and seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    os.environ["PYTHONWARNINGS"] = warnings_env()  # the kernel inherits it, as nbval's kernels do from conftest.py
    start = time.perf_counter()
    # the kernel warns on every start that local TCP is unencrypted; that is noise in a table of results
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                   extra_arguments=["--IPKernelApp.log_level=ERROR"]).execute()
    return nb, time.perf_counter() - start


def run(paths: list[Path]) -> None:
    import nbformat

    for path in paths:
        nb, seconds = execute(path)
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {seconds:.1f}s and saved", flush=True)


def table(paths: list[Path]) -> int:
    failures = 0
    print(f"{'notebook':40s} {'seconds':>8s}  status", flush=True)
    for path in paths:
        try:
            _, seconds = execute(path)
            status = "ok"
        except Exception as error:  # a failing notebook is a row in the table, not the end of the run
            last_line = (str(error).strip().splitlines() or [""])[-1][:100]  # nbclient ends with the cell's error
            seconds, status, failures = float("nan"), f"FAILED: {type(error).__name__}: {last_line}", failures + 1
        print(f"{path.name:40s} {seconds:8.1f}  {status}", flush=True)
    return 1 if failures else 0


def strip_solutions(source: str) -> str:
    """Replace each BEGIN/END SOLUTION block by a stub that raises, keeping the block's indentation."""
    pattern = re.compile(rf"^([ \t]*){re.escape(BEGIN)}[^\n]*\n.*?^[ \t]*{re.escape(END)}[^\n]*$", re.S | re.M)
    return pattern.sub(lambda m: f"{m.group(1)}{STUB}", source)


def student_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    import nbformat

    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source)
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)  # run timestamps: a copy should change only when the lesson does
    return nb


def build_student(out_dir: Path = STUDENT) -> list[Path]:
    import nbformat

    out_dir.mkdir(exist_ok=True)
    (out_dir / "README.md").write_text("Generated by `make student` from notebooks/ — do not edit by hand.\n")
    written = []
    for path in notebooks():
        target = out_dir / path.name
        nbformat.write(student_copy(nbformat.read(path, as_version=4)), target)
        written.append(target)
    print(f"wrote {len(written)} student notebooks to {out_dir}")
    return written


def code_cells(path: Path, marker: str) -> str:
    """The source of every code cell of a notebook that contains `marker` — for tests that compare an inline
    teaching copy with the package version."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == "code" and marker in c.source]
    if not sources:
        raise LookupError(f"{path.name}: no code cell contains {marker!r}")
    return "\n\n".join(sources)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorakit.course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table", "student", "warnings"])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}; the notebooks are in notebooks/")
    paths = [p.resolve() for p in args.notebooks] or notebooks()
    if args.command == "warnings":
        print(warnings_env())
    elif args.command == "run":
        run(paths)
    elif args.command == "table":
        return table(paths)
    else:
        build_student()
    return 0


if __name__ == "__main__":
    sys.exit(main())
