"""DreamBooth-LoRA with DVAR early stopping, runnable from a checkout.

The trainer is :mod:`dvar.integrations.dreambooth_lora` (``pip install -e ".[train]"``; also ``python -m
dvar.integrations.dreambooth_lora`` and the ``dvar-dreambooth-lora`` command). ``--help`` lists its flags.
"""

import sys

from dvar.integrations.dreambooth_lora import main

if __name__ == "__main__":
    sys.exit(main())
