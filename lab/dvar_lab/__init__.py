"""dvar's lab: what the benchmark, the tests and the trainers' defaults use, kept out of the library.

- :mod:`dvar_lab.models`: the embedded mini-SD (``mini_sd()``, ``load_mini_sd_pipeline()``);
- :mod:`dvar_lab.world`: the synthetic world mini-SD is trained on, its 48 concepts and classifier;
- :mod:`dvar_lab.metrics`: the identity score the benchmark judges stops by;
- :mod:`dvar_lab.tiny`: tiny random SD / SDXL / Flux pipelines for tests;
- :mod:`dvar_lab.demo`: a complete diffusers-style training script with the callback.

Install it from a dvar checkout with ``pip install -e ./lab``.
"""
