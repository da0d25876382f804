"""``python -m recap_kernels``: see :mod:`recap_kernels._cli`."""

import sys

from recap_kernels._cli import main

sys.exit(main())
