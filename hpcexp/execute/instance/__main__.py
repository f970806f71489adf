"""`python -m hpcexp.execute.instance RUN_DIR [--owned]`: the keeper of one remote-call session."""

import sys

from hpcexp.execute.instance import main

sys.exit(main())
