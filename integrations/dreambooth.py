"""DreamBooth with DVAR early stopping, runnable from a checkout.

The trainer is :mod:`dvar.integrations.dreambooth` (``pip install -e ".[train]"``; also ``python -m
dvar.integrations.dreambooth`` and the ``dvar-dreambooth`` command). ``--help`` lists its flags.
"""

import sys

from dvar.integrations.dreambooth import main

if __name__ == "__main__":
    sys.exit(main())
