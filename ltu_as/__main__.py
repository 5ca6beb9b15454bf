"""`python -m ltu_as ...` is `ltu-as ...`."""

import sys

from .cli import main

sys.exit(main())
