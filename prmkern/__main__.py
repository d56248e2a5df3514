"""`python -m prmkern ...` and `torchrun ... -m prmkern ...`: the command line (prmkern/cli.py)."""
import sys

from prmkern.cli import main

sys.exit(main())
