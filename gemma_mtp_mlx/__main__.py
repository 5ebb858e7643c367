"""`python -m gemma_mtp_mlx` and the `gemma-mtp` command.

The command line's imports (MLX, mlx-lm, transformers) take seconds; a Ctrl-C during them
exits quietly (status 130) instead of printing a traceback. Some of those libraries catch
every exception while importing optional parts, a KeyboardInterrupt included, so during the
imports Ctrl-C ends the process at once rather than raising.
"""

import os
import signal
import sys


def _exit_interrupted(signum, frame) -> None:
    os._exit(130)


def main() -> int:
    previous = signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        from .cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, previous)
    return cli_main()  # it answers a Ctrl-C after start-up itself


if __name__ == "__main__":
    sys.exit(main())
