"""`python -m prmkern ...` and `torchrun ... -m prmkern ...`: the command line (prmkern/cli/entry.py)."""
import sys

from prmkern.cli.entry import main

sys.exit(main())
