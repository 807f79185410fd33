"""Custom Diffusion with DVAR early stopping, runnable from a checkout.

The trainer is :mod:`dvar.integrations.custom_diffusion` (``pip install -e ".[train]"``; also ``python -m
dvar.integrations.custom_diffusion`` and the ``dvar-custom-diffusion`` command). ``--help`` lists its flags.
"""

import sys

from dvar.integrations.custom_diffusion import main

if __name__ == "__main__":
    sys.exit(main())
