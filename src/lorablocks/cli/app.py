"""The Typer application shared by every verb module, and the error boundary.

Each verb lives in a small module of this package (``adapters``, ``training``, ``study``) that registers
itself on :data:`app`; a verb parses its arguments, calls one library function and prints.

Exit codes: 0 success; 2 the input or the environment was refused (a library error, an existing output, a
usage error, a disk or permission problem), with one line; 1 an internal error (a bug: one line asking for a
report; ``LORABLOCKS_DEBUG=1`` shows the traceback); 130 interrupted (Ctrl-C), with one line.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from lorablocks.cli import INTERRUPTED
from lorablocks.errors import LoraBlocksError
from lorablocks.errors import one_line

__all__ = ["app", "console", "run_app", "main", "one_line", "print_error", "quiet_libraries"]

app = typer.Typer(
    name="lorablocks",
    help="LoRA adapters as building blocks: exact sums, subtraction, overlap, training, evaluation, study.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Progress and tables go to stderr so that stdout stays machine-readable where a verb prints JSON.
console = Console(stderr=True)

EXIT_INTERNAL, EXIT_REFUSED, EXIT_INTERRUPTED = 1, 2, 130


def quiet_libraries() -> None:
    """Our own progress and messages only: no loading bars or advisory warnings from transformers/PEFT."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(remote file|config file in).*", category=UserWarning)


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr, on one line (never wrapped, never read as markup)."""
    console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)


#: Settings whose command-line spelling is not ``--setting-name`` (None: a positional argument).
_FLAGS: dict[str, str | None] = {"adapters": None, "params": None, "probe_data": "--probe-data"}


def flag_of(setting: str | None) -> str | None:
    """The command-line flag of a library setting (``max_length`` -> ``--max-length``)."""
    if not setting or "." in setting:
        return None
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def user_message(exc: LoraBlocksError) -> str:
    """A library error's line, with what the library does not know: the flag at fault, how to replace."""
    message = one_line(exc)
    flag = flag_of(getattr(exc, "setting", None))
    if flag and flag not in message:
        message = f"{flag}: {message}"
    if getattr(exc, "replaceable", False) and "--force" not in message:
        message += " (--force replaces it)"
    return message


def run_app(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (see the module docstring); never a traceback."""
    quiet_libraries()
    try:
        result = app(args=argv, standalone_mode=False)
    except LoraBlocksError as exc:
        print_error(user_message(exc))
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return interrupted()
    except Exception as exc:  # usage errors and the unexpected
        return _other_error(exc)
    # With standalone_mode=False click returns the code of an Exit, and turns Ctrl-C into Exit(130).
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    return interrupted() if code == EXIT_INTERRUPTED else code


def interrupted() -> int:
    """Say that the run was interrupted, in one line; the exit code 130."""
    console.print(f"[bold red]{INTERRUPTED}[/bold red]", highlight=False, soft_wrap=True)
    return EXIT_INTERRUPTED


def _other_error(exc: Exception) -> int:
    """Click's usage errors as click shows them; OS and memory problems in one line; anything else is a
    bug: one line asking for a report (``LORABLOCKS_DEBUG=1`` re-raises it to show the traceback)."""
    if _is_click(exc, "ClickException"):
        exc.show()  # type: ignore[attr-defined]
        return getattr(exc, "exit_code", EXIT_REFUSED)
    if _is_click(exc, "Exit"):
        return exc.exit_code  # type: ignore[attr-defined]
    if _is_click(exc, "Abort"):  # end of input at a prompt
        print_error("aborted")
        return EXIT_INTERNAL
    if isinstance(exc, MemoryError):
        print_error("out of memory")
        return EXIT_REFUSED
    if isinstance(exc, OSError) and exc.strerror:
        print_error(f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror)
        return EXIT_REFUSED
    if os.environ.get("LORABLOCKS_DEBUG"):
        raise exc
    print_error(f"internal error: {type(exc).__name__}: {one_line(exc)} (please report)")
    return EXIT_INTERNAL


def _is_click(exc: BaseException, name: str) -> bool:
    """``exc`` is an instance of click's exception ``name``, from click itself or Typer's vendored copy."""
    for module in ("typer._click.exceptions", "click.exceptions"):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def main() -> None:
    """Console entry point (the verbs are registered by :func:`lorablocks.cli.main`, which calls this)."""
    sys.exit(run_app(sys.argv[1:]))
