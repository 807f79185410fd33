"""Score saved weights again: more images, another sampling seed, another scorer, any saved step. No training.

Every trajectory keeps its learned weights (the TI embedding, the LoRA, the Custom Diffusion deltas) at each
identity check, each rule's stop and the premature steps, as ``OUT/weights/<method>/<concept>/step_NNNNN.safetensors``.
This command sets the method's models up as a training run would (new tokens, adapters), loads each saved step
into them, samples and scores, and writes ``OUT/rescored/<name>/<method>/<concept>.json``:
``{"settings": ..., "steps": {"<step>": {identity, identity_embedding, ...}}, "variants": {"dvar": step, ...}}``.
Finished (method, concept) files are skipped, so it resumes; ``--shard i/n`` splits it across processes.

    # every check and every variant again with 16 images per prompt and the next-but-two seed
    python -m benchmarks.personalization.rescore runs/full --name seed1237 --seed 1237 --images-per-prompt 16
    # only the variants' steps (the budget, each rule's stop, the controls), with alignment
    python -m benchmarks.personalization.rescore runs/full --name variants-aligned --steps variants --alignment
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.personalization"

from .config import BenchmarkConfig, MethodSettings  # noqa: E402
from .scoring import ConceptSpec  # noqa: E402

EXIT_USAGE = 2
STEP_FILE_PREFIX = "step_"


class _Aborted(Exception):
    """Raised from ``on_train_begin`` once the work is done: the run ends before its first step."""


def with_method_models(cfg: BenchmarkConfig, settings: MethodSettings, concept: ConceptSpec, work_dir: Path,
                       model: Optional[str], work: Callable[[Any, Any, str], Any]) -> Any:
    """Set the method's models up exactly as its training run did (same flags: new tokens, adapters), call
    ``work(trainer, sampler, phrase)`` before the first training step, and end the run there (nothing trains,
    nothing is saved). Returns what ``work`` returned."""
    from dvar.integrations.trainer import TrainingObserver
    from dvar.integrations.trainer import main as train_main

    from .monitors import Sampler
    from .run import method_instance, trainer_argv

    phrase, argv = trainer_argv(cfg, settings, concept, work_dir, model)
    result: Dict[str, Any] = {}

    class Work(TrainingObserver):
        def on_train_begin(self, trainer: Any) -> None:
            result["value"] = work(trainer, Sampler(trainer, cfg.sampling), phrase)
            raise _Aborted

    try:
        code = train_main(method_instance(settings.method), argv, callbacks=[Work()])
    except _Aborted:
        code = 0
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    if code != 0 or "value" not in result:
        raise RuntimeError(f"{settings.method} on {concept.name}: could not set the models up (exit {code})")
    return result["value"]


def load_weights(path: Path) -> Dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def score_saved_steps(cfg: BenchmarkConfig, settings: MethodSettings, concept: ConceptSpec, scorer: Any,
                      weights_dir: Path, steps: Sequence[int], work_dir: Path, model: Optional[str] = None,
                      per_prompt: Optional[int] = None, seed: Optional[int] = None, alignment: bool = False,
                      retest: bool = False) -> Dict[int, Dict[str, Any]]:
    """``{step: scores}`` of the weights saved at ``steps`` (:func:`.monitors.score_current_weights`)."""
    from .monitors import score_current_weights, weights_file

    missing = [s for s in steps if not weights_file(weights_dir, s).is_file()]
    if missing:
        raise FileNotFoundError(f"{weights_dir}: no saved weights for step(s) {missing}")

    def work(trainer: Any, sampler: Any, phrase: str) -> Dict[int, Dict[str, Any]]:
        scorer.references(concept)
        out = {}
        for step in steps:
            trainer.method.load_learned_state(load_weights(weights_file(weights_dir, step)), trainer.parts,
                                              trainer.accelerator)
            out[step] = score_current_weights(sampler, scorer, concept, phrase, alignment=alignment, retest=retest,
                                              per_prompt=per_prompt, seed=seed)
        return out

    return with_method_models(cfg, settings, concept, work_dir, model, work)


def saved_steps(weights_dir: Path) -> List[int]:
    """The steps with saved weights in a trajectory's folder, in order."""
    return sorted(int(p.stem[len(STEP_FILE_PREFIX):]) for p in Path(weights_dir).glob(f"{STEP_FILE_PREFIX}*.safetensors"))


def variant_steps(out: Path, method: str, concept: str) -> Dict[str, int]:
    """``{variant: step}`` from a concept's records (the budget, each rule's stop, the controls)."""
    folder = Path(out) / "records" / method / concept
    return {p.stem: json.loads(p.read_text())["steps"] for p in sorted(folder.glob("*.json"))}


# -- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .run import parse_shard

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="A benchmark results folder with weights/ (benchmark format 2).")
    parser.add_argument("--name", required=True, help="Name of this rescoring: written to OUT/rescored/NAME/.")
    parser.add_argument("--steps", default="all",
                        help="'all' saved steps, 'checks' (the identity checks), 'variants' (each variant's step), or "
                             "a comma-separated list of steps.")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="Identity images per training-style prompt (default: the benchmark's variant setting).")
    parser.add_argument("--seed", type=int, default=None, help="Sampling seed (default: the benchmark's).")
    parser.add_argument("--alignment", action="store_true", help="Also score alignment (new-context prompts).")
    parser.add_argument("--retest", action="store_true", help="Also score identity with seed + 1.")
    parser.add_argument("--methods", nargs="+", default=None, help="Only these methods.")
    parser.add_argument("--concepts", nargs="+", default=None, help="Only these concepts.")
    parser.add_argument("--clip", default=None, help="Score with this local CLIP (transformers format) instead.")
    parser.add_argument("--model", default=None, help="The model the benchmark trained (default: its benchmark.json's).")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), help="Rescore every n-th trajectory, i/n.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    return parser


def _steps_for(selection: str, weights_dir: Path, checks: Sequence[int], variants: Dict[str, int]) -> List[int]:
    saved = saved_steps(weights_dir)
    if selection == "all":
        return saved
    if selection == "checks":
        return [s for s in checks if s in saved]
    if selection == "variants":
        return sorted(set(variants.values()))
    try:
        return sorted({int(part) for part in selection.split(",")})
    except ValueError:
        raise ValueError(f"--steps {selection!r}: expected all, checks, variants or steps such as 50,100") from None


def embedded_model_path(recorded: str) -> Optional[str]:
    """The model folder a benchmark recorded: None for mini-SD (the trainers' default), mini-flow's folder,
    else the path as recorded."""
    if recorded.startswith("mini-SD") or not recorded:
        return None
    if recorded.startswith("mini-flow"):
        from dvar.models import mini_flow

        return str(mini_flow())
    return recorded


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .report import load_meta
    from .run import concepts_from_meta, quiet_libraries, write_json

    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        meta = load_meta(args.out)
        if not meta or not (args.out / "weights").is_dir():
            raise ValueError(f"{args.out} holds no benchmark with saved weights (benchmark.json and weights/ from a "
                             "format-2 run); run python -m benchmarks.personalization.run first")
        cfg = BenchmarkConfig.from_json(meta["config"])
        if args.images_per_prompt is not None and args.images_per_prompt < 1:
            raise ValueError(f"--images-per-prompt must be >= 1 (got {args.images_per_prompt})")
        if meta.get("scorer") == "clip" and not args.clip:
            raise ValueError("this benchmark was scored with CLIP: pass --clip PATH")
        concepts = concepts_from_meta(args.out, meta)
        jobs: List[Tuple[MethodSettings, ConceptSpec]] = [
            (settings, concept) for settings in cfg.methods if not args.methods or settings.method in args.methods
            for concept in concepts.get(settings.method, []) if not args.concepts or concept.name in args.concepts
        ]
        if not jobs:
            raise ValueError("no trajectory matches --methods / --concepts")
        if args.steps not in ("all", "checks", "variants"):
            _steps_for(args.steps, Path("."), [], {})  # refuse a bad list before any work
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    quiet_libraries()
    from .scoring import ClipScorer, WorldScorer

    scorer = ClipScorer(args.clip) if args.clip else WorldScorer()
    model = args.model or embedded_model_path(str(meta.get("model", "")))
    index, count = args.shard
    done = skipped = 0
    for number, (settings, concept) in enumerate(jobs):
        if number % count != index - 1:
            continue
        target = args.out / "rescored" / args.name / settings.method / f"{concept.name}.json"
        trace_path = args.out / "traces" / settings.method / f"{concept.name}.json"
        weights_dir = args.out / "weights" / settings.method / concept.name
        if target.is_file():
            skipped += 1
            continue
        if not trace_path.is_file() or not weights_dir.is_dir():
            print(f"{settings.method} {concept.name}: not trained yet (no trace or weights), skipped")
            continue
        trace = json.loads(trace_path.read_text())
        variants = variant_steps(args.out, settings.method, concept.name)
        steps = _steps_for(args.steps, weights_dir, trace["identity_checks"]["steps"], variants)
        started = time.perf_counter()
        scores = score_saved_steps(cfg, settings, concept, scorer, weights_dir, steps,
                                   args.out / "work" / settings.method / f"{concept.name}-rescore", model,
                                   per_prompt=args.images_per_prompt, seed=args.seed, alignment=args.alignment,
                                   retest=args.retest)
        write_json(target, {
            "method": settings.method, "concept": concept.name,
            "settings": {"images_per_prompt": args.images_per_prompt or cfg.sampling.identity_images_per_prompt,
                         "seed": cfg.sampling.seed if args.seed is None else args.seed, "alignment": args.alignment,
                         "retest": args.retest, "scorer": "clip" if args.clip else "world"},
            "variants": variants, "steps": {str(step): value for step, value in scores.items()},
            "seconds": round(time.perf_counter() - started, 3),
        })
        done += 1
        print(f"{settings.method} {concept.name}: {len(steps)} steps rescored [{time.perf_counter() - started:.0f} s]")
    print(f"rescored {done}, already done {skipped}: {args.out / 'rescored' / args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
