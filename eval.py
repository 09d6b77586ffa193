"""The seed's interface: `python eval.py -p <path_to_model_checkpoint>` (same as `peftlab eval -p ...`)."""

import sys

from peftlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
