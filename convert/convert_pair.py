#!/usr/bin/env python3
"""Convert a Gemma 4 target and its MTP drafter into one MLX pair directory.

For a checkout without the package installed (its dependencies still are needed):

    python convert/convert_pair.py --model google/gemma-4-E2B-it \
        --draft-model google/gemma-4-E2B-it-assistant -o gemma-4-E2B-it-mtp-4bit -q

The options are those of `gemma-mtp convert`; see --help. Load the result with
`gemma_mtp_mlx.load("gemma-4-E2B-it-mtp-4bit")`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_mtp_mlx.checkpoint import CheckpointError  # noqa: E402
from gemma_mtp_mlx.convert import add_arguments, run  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"convert_pair: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
