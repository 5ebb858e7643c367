#!/usr/bin/env python3
"""Convert a Gemma 4 target and its MTP drafter into one MLX pair directory.

For a checkout without the package installed (its dependencies still are needed):

    python convert/convert_pair.py --model google/gemma-4-E2B-it \
        --draft-model google/gemma-4-E2B-it-assistant -o gemma-4-E2B-it-mtp-4bit -q

The same as `gemma-mtp convert`; see --help. Load the result with
`gemma_mtp_mlx.load("gemma-4-E2B-it-mtp-4bit")`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma_mtp_mlx.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
