"""`python -m prmkern.cli ...`: the command line (prmkern/cli/entry.py)."""
import sys

from prmkern.cli.entry import main

sys.exit(main())
