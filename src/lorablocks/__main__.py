"""``python -m lorablocks``: the command line (Ctrl-C at any moment exits 130 without a traceback)."""

from lorablocks.cli import main

if __name__ == "__main__":
    main()
