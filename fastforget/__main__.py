"""`python -m fastforget ...` is the `fastforget` command (also under torchrun: `torchrun ... -m fastforget erase ...`)."""
import sys

from fastforget.cli import main

sys.exit(main())
