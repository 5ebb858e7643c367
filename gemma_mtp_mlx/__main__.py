"""`python -m gemma_mtp_mlx` and the `gemma-mtp` command.

The command line's imports (MLX, mlx-lm, transformers) take seconds; a Ctrl-C during them
exits quietly (status 130) instead of printing a traceback.
"""

import sys


def main() -> int:
    try:
        from .cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:  # cli_main answers those after start-up itself
        return 130


if __name__ == "__main__":
    sys.exit(main())
