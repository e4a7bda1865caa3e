"""The Typer application shared by every verb module, and the error boundary.

Each verb lives in a small module of this package (``adapters``, ``training``, ``study``) that registers
itself on :data:`app`; a verb parses its arguments, calls one library function and prints.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.console import Console

from lorablocks.errors import LoraBlocksError

app = typer.Typer(
    name="lorablocks",
    help="LoRA adapters as building blocks: exact sums, subtraction, overlap, training, evaluation, study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Progress and tables go to stderr so that stdout stays machine-readable where a verb prints JSON.
console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print one clear line and exit non-zero."""
    console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def quiet_libraries() -> None:
    """Our own progress and messages only: no loading bars or advisory warnings from transformers/PEFT."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(remote file|config file in).*", category=UserWarning)


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI; library errors become one line and exit code 2, never a traceback."""
    quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except LoraBlocksError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/bold red] (outputs are written atomically; nothing half-written)")
        return 130
    except Exception as exc:  # usage errors: Typer vendors its own click (typer._click) since 0.29
        if _is_click(exc, "ClickException"):
            exc.show()
            return getattr(exc, "exit_code", 2)
        if _is_click(exc, "Exit"):
            return exc.exit_code
        if _is_click(exc, "Abort"):
            return 1
        if isinstance(exc, (MemoryError, OSError)):
            console.print(f"[bold red]error:[/bold red] {type(exc).__name__}: {exc}")
            return 2
        raise
    return 0


def _is_click(exc: BaseException, name: str) -> bool:
    """``exc`` is an instance of click's exception ``name``, from click itself or Typer's vendored copy."""
    for module in ("typer._click.exceptions", "click.exceptions"):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def main() -> None:
    sys.exit(run_app(sys.argv[1:]))
