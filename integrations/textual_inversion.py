"""Textual Inversion with DVAR early stopping, runnable from a checkout.

The trainer is :mod:`dvar.integrations.textual_inversion` (``pip install -e ".[train]"``; also ``python -m
dvar.integrations.textual_inversion`` and the ``dvar-textual-inversion`` command). ``--help`` lists its flags.
"""

import sys

from dvar.integrations.textual_inversion import main

if __name__ == "__main__":
    sys.exit(main())
