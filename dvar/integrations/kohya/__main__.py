"""``python -m dvar.integrations.kohya train_network --early_stop ...``"""

from .launch import main

raise SystemExit(main())
