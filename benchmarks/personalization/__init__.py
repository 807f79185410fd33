"""The DVAR paper's comparison, rerun: concepts x methods x {fixed budget, CLIP-s, few iters, DVAR, auto}.

``python -m benchmarks.personalization.run --preset quick --out runs/quick`` trains and scores
(:mod:`.run`); ``python -m benchmarks.personalization.report runs/quick`` writes the tables and
plots (:mod:`.report`), with the non-inferiority decision of each rule (:mod:`.noninferiority`).
Settings live in :mod:`.config`, scoring in :mod:`.scoring`, the stopping rules that watch each run
in :mod:`.monitors` (the CLIP-s baseline in :mod:`.baselines`). The recorded trajectories replay any
rule (:mod:`.replay`) and their saved weights can be scored again (:mod:`.rescore`).
"""
