"""`python -m hpcexp.execute.local RUN_DIR`: the detached supervisor of one local run."""

import sys

from hpcexp.execute.local import main

sys.exit(main())
