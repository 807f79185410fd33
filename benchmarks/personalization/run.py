"""Run the DVAR paper's comparison: concepts x methods x {baseline, CLIP-s, few iters, DVAR, auto}.

For each (concept, method) one training run goes to the full step budget while DVAR, ``auto`` and
the CLIP-s identity checks watch it (:mod:`.monitors`); the learned weights at each rule's stop
are scored, and each variant's cost is the measured training time up to its stop plus the
measured time of its own rule. The run keeps its weights at every identity check
(``OUT/weights``) and each frozen example's loss at every step, so that rules can be replayed
(:mod:`.replay`) and weights scored again (:mod:`.rescore`) without training. "Few iters" (a
fixed budget: the method's mean CLIP-s stop, on the check grid) is scored from the same
trajectory's saved weights once every trajectory of the method is done, and timed on it.
Every finished job writes its JSON files at once, so an interrupted run resumes where it
stopped; ``--shard i/n`` runs every n-th job (ordinary processes, e.g. one per GPU or machine,
sharing --out).

    python -m benchmarks.personalization.run --preset quick --out runs/quick
    python -m benchmarks.personalization.run --preset full --out runs/full --shard 1/2   # and 2/2
    python -m benchmarks.personalization.report runs/full
    # the learning-rate axis (issue 12): 12 concepts per method at half and twice the learning rate
    python -m benchmarks.personalization.run --preset full --lr-scale 0.5 --concepts-per-method 12 --traces-only \\
        --out runs/full-lr0.5
    # Stable Diffusion, your photos, a local CLIP:
    python -m benchmarks.personalization.run --config benchmarks/personalization/paper48.json \\
        --model ./sd-v1-5 --concepts ./dreambooth_dataset --clip ./clip-vit-base-patch32 --out runs/sd
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.personalization"

from .config import (  # noqa: E402
    GROUP_OF_METHOD,
    METHOD_ORDER,
    PREMATURE_STOPS,
    BenchmarkConfig,
    MethodSettings,
    for_flow_model,
    load_config,
    preset,
)
from .scoring import ConceptSpec, bundled_concepts, folder_concepts  # noqa: E402
from dvar.integrations.flux import model_family  # noqa: E402

EXIT_USAGE = 2
#: The trainer's exit codes for Ctrl-C and SIGTERM (128 + the signal).
INTERRUPTED_CODES = (130, 143)


class JobInterrupted(Exception):
    """A job's training was stopped by a signal: the benchmark stops there, and the same command resumes it."""

    def __init__(self, code: int, job: str) -> None:
        super().__init__(job)
        self.code, self.job = code, job


# -- what a job trains ----------------------------------------------------------------------


def method_instance(name: str) -> Any:
    from dvar.integrations import custom_diffusion, dreambooth, dreambooth_lora, textual_inversion

    classes = {
        "textual_inversion": textual_inversion.TextualInversion,
        "dreambooth_lora": dreambooth_lora.DreamBoothLoRA,
        "custom_diffusion": custom_diffusion.CustomDiffusion,
        "dreambooth": dreambooth.DreamBooth,
    }
    return classes[name]()


def concept_arguments(method: str, concept: ConceptSpec) -> Tuple[str, List[str]]:
    """(how prompts name the concept, the trainer flags for its data and prompts)."""
    word, initializer = concept.class_word, concept.initializer_token or concept.class_word
    if method == "textual_inversion":
        return "<concept>", ["--train_data_dir", str(concept.path), "--placeholder_token", "<concept>",
                             "--initializer_token", initializer]
    if method == "custom_diffusion":
        return f"<new1> {word}", ["--instance_data_dir", str(concept.path), "--modifier_token", "<new1>",
                                  "--initializer_token", initializer, "--instance_prompt", f"a photo of a <new1> {word}"]
    return f"sks {word}", ["--instance_data_dir", str(concept.path), "--instance_prompt", f"a photo of sks {word}"]


def trainer_argv(cfg: BenchmarkConfig, settings: MethodSettings, concept: ConceptSpec, output_dir: Path,
                 model: Optional[str], max_train_steps: Optional[int] = None) -> Tuple[str, List[str]]:
    phrase, data_args = concept_arguments(settings.method, concept)
    argv = data_args + settings.trainer_args(max_train_steps) + [
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--seed", str(cfg.seed),
        "--num_validation_images", "0", "--checkpointing_steps", str(settings.max_train_steps + 1),
    ]
    if model:
        argv += ["--pretrained_model_name_or_path", model]
    return phrase, argv


# -- the jobs -----------------------------------------------------------------------------


class Benchmark:
    """A results folder and the jobs that fill it."""

    def __init__(self, cfg: BenchmarkConfig, out: Path, concepts: Dict[str, List[ConceptSpec]], scorer: Any,
                 model: Optional[str] = None, keep_weights: bool = False, traces_only: bool = False,
                 update_statistics: bool = True) -> None:
        self.cfg, self.out, self.concepts, self.scorer = cfg, Path(out), concepts, scorer
        self.model, self.keep_weights, self.traces_only = model, keep_weights, traces_only
        self.update_statistics = update_statistics

    def trajectory_jobs(self) -> List[Tuple[MethodSettings, ConceptSpec, bool]]:
        """(method, concept, traced) jobs, concept-major: an unfinished run has every method's first concepts."""
        jobs = []
        longest = max(len(self.concepts[settings.method]) for settings in self.cfg.methods)
        for index in range(longest):
            for settings in self.cfg.methods:
                if index < len(self.concepts[settings.method]):
                    jobs.append((settings, self.concepts[settings.method][index], index < self.cfg.traced_per_method))
        return jobs

    def record_path(self, method: str, concept: str, variant: str) -> Path:
        return self.out / "records" / method / concept / f"{variant}.json"

    def trace_path(self, method: str, concept: str) -> Path:
        return self.out / "traces" / method / f"{concept}.json"

    def weights_dir(self, method: str, concept: str) -> Path:
        return self.out / "weights" / method / concept

    def run_trajectory(self, settings: MethodSettings, concept: ConceptSpec, traced: bool) -> Dict[str, Dict[str, Any]]:
        from dvar.integrations.trainer import main as train_main

        from .monitors import TrajectoryMonitor, score_current_weights

        started = time.perf_counter()
        method, work = method_instance(settings.method), self.out / "work" / settings.method / concept.name
        phrase, argv = trainer_argv(self.cfg, settings, concept, work, self.model)
        traced = traced and not self.traces_only
        ablation = self.cfg.ablation_parts if traced and settings.method in self.cfg.ablation_methods else ()
        premature = {} if self.traces_only else self.premature_steps(settings)
        weights_dir = self.weights_dir(settings.method, concept.name)
        shutil.rmtree(weights_dir, ignore_errors=True)  # an interrupted job's files: this run writes them again
        monitor = TrajectoryMonitor(settings, self.cfg.sampling, self.scorer, concept, phrase,
                                    trace_full=traced, ablation_parts=ablation, job_started=started,
                                    checks_to_budget=self.cfg.checks_to_budget, loss_to_budget=self.cfg.loss_to_budget,
                                    premature_steps=premature, weights_dir=weights_dir,
                                    update_statistics=self.update_statistics)
        code = train_main(method, argv, callbacks=[monitor])
        if code in INTERRUPTED_CODES:
            raise JobInterrupted(code, f"{settings.method} on {concept.name}")
        if code != 0:
            raise RuntimeError(f"{settings.method} on {concept.name}: the trainer exited with {code}")
        save_s = time.perf_counter() - monitor.last
        budget = len(monitor.train_step_s)
        trainer = monitor.trainer
        monitor.save_step(budget)  # the budget's weights (a check step in every preset: usually already there)

        records: Dict[str, Dict[str, Any]] = {}
        baseline_scores = score_current_weights(monitor.sampler, self.scorer, concept, phrase, retest=True,
                                                alignment=not self.traces_only)
        records["baseline"] = self._record(settings, concept, "baseline", budget, "budget", monitor, save_s,
                                           baseline_scores)
        records["baseline"].update({k: baseline_scores[k] for k in RETEST_KEYS})
        for variant in monitor.stops:
            stop = monitor.stops[variant]
            if self.traces_only:  # where each rule stopped, not what its weights score
                records[variant] = self._record(settings, concept, variant, stop or budget,
                                                monitor.reasons[variant] or "budget (the rule did not fire)", monitor,
                                                save_s, {})
                continue
            if stop is None:  # the rule never fired: that variant trains to the budget
                scores = {k: v for k, v in records["baseline"].items() if k in SCORE_KEYS}
                reason = "budget (the rule did not fire)"
            else:
                method.load_learned_state(monitor.snapshots[variant], trainer.parts, trainer.accelerator)
                scores = score_current_weights(monitor.sampler, self.scorer, concept, phrase)
                reason = monitor.reasons[variant]
            records[variant] = self._record(settings, concept, variant, stop or budget, reason, monitor, save_s, scores)
        for variant, step in premature.items():  # the controls: identity only (no alignment), from the same run
            method.load_learned_state(monitor.snapshots[variant], trainer.parts, trainer.accelerator)
            scores = score_current_weights(monitor.sampler, self.scorer, concept, phrase, alignment=False)
            reason = f"premature control: {PREMATURE_STOPS[variant]:.0%} of the budget"
            records[variant] = self._record(settings, concept, variant, step, reason, monitor, save_s, scores)

        prompts = len(concept.identity_prompts)
        trace = {
            "format": TRACE_FORMAT,
            "concept": concept.name, "method": settings.method, "max_train_steps": settings.max_train_steps,
            "seed": self.cfg.seed, "informative": traced,
            "setup_s": round(monitor.setup_s, 3), "save_s": round(save_s, 3),
            "train_step_s": [round(s, 5) for s in monitor.train_step_s], "train_loss": monitor.train_loss,
            "updates": None if monitor.updates is None else monitor.updates.to_json(),
            "dvar": monitor.dvar_watches["dvar"].to_json(),
            "dvar_variants": {name: w.to_json() for name, w in monitor.dvar_watches.items() if name != "dvar"},
            "identity_checks": {**monitor.identity_trace, "every": settings.check_every, "stop_step": monitor.clip_s_stop,
                                "eps": settings.clip_s_eps, "patience": settings.clip_s_patience,
                                "images": self.cfg.sampling.check_images_per_prompt * prompts},
            "clip_s_checks": {**monitor.clip_s_trace, "every": settings.clip_s_period, "eps": settings.clip_s_eps,
                              "patience": settings.clip_s_patience, "stop_step": monitor.clip_s_stop,
                              "images": self.cfg.sampling.clip_s_images * prompts},
            "weights": {"folder": str(weights_dir.relative_to(self.out)), "steps": sorted(monitor.saved_weights),
                        "bytes": sum(monitor.saved_weights.values()), "seconds": round(monitor.weights_s, 3)},
        }
        if monitor.ablation_watches:
            trace["ablation"] = monitor.ablation_json()
        trace["job_s"] = round(time.perf_counter() - started, 3)  # everything: training, rules, scoring
        write_json(self.trace_path(settings.method, concept.name), trace)
        for variant, record in records.items():  # dvar last: its file marks the job done
            if variant != "dvar":
                write_json(self.record_path(settings.method, concept.name, variant), record)
        write_json(self.record_path(settings.method, concept.name, "dvar"), records["dvar"])
        if not self.keep_weights:
            shutil.rmtree(work, ignore_errors=True)
        return records

    def _record(self, settings: MethodSettings, concept: ConceptSpec, variant: str, steps: int, reason: Optional[str],
                monitor: Any, save_s: float, scores: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "concept": concept.name, "method": settings.method, "variant": variant, "steps": steps,
            "max_train_steps": settings.max_train_steps, "stop_reason": reason, "seed": self.cfg.seed,
            **monitor.variant_timing(variant, steps, save_s),
            **{k: scores.get(k) for k in SCORE_KEYS},
        }

    def premature_steps(self, settings: MethodSettings) -> Dict[str, int]:
        """``{variant: step}`` of the deliberately premature stops (step 0, 10% and 25% of the budget)."""
        if not self.cfg.premature_stops:
            return {}
        return {variant: round(share * settings.max_train_steps) for variant, share in PREMATURE_STOPS.items()}

    def few_iters_step(self, settings: MethodSettings) -> Optional[Tuple[float, int]]:
        """(mean CLIP-s stop of the method over all its concepts, that mean on the check grid), once every
        trajectory of the method is done; None before. Few iters is scored from the trajectory's weights saved at
        that check (the nearest one, at least the first), so its step is a multiple of ``check_every``."""
        stops = []
        for concept in self.concepts[settings.method]:
            path = self.record_path(settings.method, concept.name, "clip_s")
            if not self.record_path(settings.method, concept.name, "dvar").is_file() or not path.is_file():
                return None
            stops.append(json.loads(path.read_text())["steps"])
        mean, every = sum(stops) / len(stops), settings.check_every
        return mean, min(settings.max_train_steps, max(every, every * math.floor(mean / every + 0.5)))

    def score_few_iters(self, settings: MethodSettings, concept: ConceptSpec, mean: float, step: int) -> Dict[str, Any]:
        """Few iters on one concept: the trajectory's weights at ``step``, scored like every variant, and timed on the
        trajectory (setup, its first ``step`` training steps, the save): a fixed budget of ``step`` steps."""
        from .monitors import variant_timing
        from .rescore import score_saved_steps

        started = time.perf_counter()
        trace = json.loads(self.trace_path(settings.method, concept.name).read_text())
        work = self.out / "work" / settings.method / f"{concept.name}-few"
        scores = score_saved_steps(self.cfg, settings, concept, self.scorer, self.weights_dir(settings.method, concept.name),
                                   [step], work, self.model, alignment=True)[step]
        record = {
            "concept": concept.name, "method": settings.method, "variant": "few_iters", "steps": step,
            "max_train_steps": settings.max_train_steps, "seed": self.cfg.seed,
            "stop_reason": f"fixed budget {step} steps (the mean CLIP-s stop {mean:.0f} on the {settings.check_every}-step "
                           "check grid; scored from the trajectory's weights)",
            **variant_timing(trace["setup_s"], trace["train_step_s"], step, 0.0, trace["save_s"]),
            **{k: scores.get(k) for k in SCORE_KEYS},
            "job_s": round(time.perf_counter() - started, 3),
        }
        write_json(self.record_path(settings.method, concept.name, "few_iters"), record)
        return record

    def run(self, shard: Tuple[int, int] = (1, 1), log: Any = print) -> bool:
        """Run this shard's pending jobs; True when the whole benchmark (all shards) is complete."""
        index, count = shard
        jobs = self.trajectory_jobs()
        mine = [job for k, job in enumerate(jobs) if k % count == index - 1]
        pending = [job for job in mine if not self.record_path(job[0].method, job[1].name, "dvar").is_file()]
        log(f"{len(jobs)} trajectories in all, {len(mine)} in shard {index}/{count}, {len(pending)} to run")
        for number, (settings, concept, traced) in enumerate(pending, 1):
            started = time.perf_counter()
            records = self.run_trajectory(settings, concept, traced)
            base = records["baseline"]
            summary = ", ".join(
                f"{v} {records[v]['steps']} steps ({base['wall_time_s'] / records[v]['wall_time_s']:.2f}x"
                + (f", identity {records[v]['identity'] - base['identity']:+.3f})" if records[v]["identity"] is not None
                   else ")")
                for v in records if v != "baseline"
            )
            log(f"[{number}/{len(pending)}] {settings.method} {concept.name}{' (traced)' if traced else ''}: "
                f"baseline {base['steps']} steps, identity {base['identity']:.3f}; {summary} "
                f"[{time.perf_counter() - started:.0f} s]")

        if self.traces_only:  # no few iters: the trajectories are what benchmarks/rules.py replays
            return False
        complete = True
        for settings in self.cfg.methods:
            found = self.few_iters_step(settings)
            if found is None:
                complete = False
                log(f"few iters for {settings.method} waits for the other shards' trajectories; rerun when they are done")
                continue
            mean, steps = found
            for k, job in enumerate(jobs):
                if job[0].method != settings.method or k % count != index - 1:
                    continue
                concept = job[1]
                if self.record_path(settings.method, concept.name, "few_iters").is_file():
                    continue
                record = self.score_few_iters(settings, concept, mean, steps)
                log(f"few iters {settings.method} {concept.name}: {steps} steps (mean CLIP-s stop {mean:.0f}), "
                    f"identity {record['identity']:.3f}")
        return complete and all(
            self.record_path(s.method, c.name, "few_iters").is_file() for s, c, _ in jobs
        )


#: 2: per-example frozen losses, weights at every check (OUT/weights), ``auto``, CLIP-s at its own cadence;
#: 3: and every step's update statistics (``updates``: :class:`.monitors.UpdateStatistics`).
TRACE_FORMAT = 3
SCORE_KEYS = ("identity", "identity_embedding", "identity_images", "alignment", "alignment_by_attribute", "images_scored")
RETEST_KEYS = ("identity_retest", "identity_embedding_retest")


def write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def quiet_libraries() -> None:
    """No per-run progress bars or load warnings (one line per job instead); imports done before any job is timed."""
    import diffusers
    import transformers

    import dvar.integrations.trainer  # noqa: F401

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def machine_description() -> str:
    import torch

    cpu = f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads"
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.platform()}, Python {platform.python_version()}, {cpu}{gpu}"


# -- command line -----------------------------------------------------------------------------


def parse_shard(text: str) -> Tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected i/n, e.g. 1/2") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: i must be between 1 and n")
    return index, count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="Results folder (resumed if it exists).")
    parser.add_argument("--preset", choices=["ci", "quick", "full"], default=None, help="Mini-SD presets (default: quick).")
    parser.add_argument("--config", type=Path, default=None, help="A JSON config instead of a preset (e.g. paper48.json).")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), help="Run every n-th job, i/n (default 1/1).")
    parser.add_argument("--methods", nargs="+", choices=METHOD_ORDER, default=None, help="Only these methods.")
    parser.add_argument("--concepts-per-method", type=int, default=None, help="Only the first N concepts per method.")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="Multiply every method's learning rate (the learning-rate axis, e.g. 0.5 or 2; use its own --out).")
    parser.add_argument("--world-concepts", type=Path, default=None,
                        help="Another synthetic concept set (python -m dvar_lab.world.concepts --out DIR --seed S).")
    parser.add_argument("--model", default=None,
                        help="Local diffusers model folder, or mini-flow (the embedded Flux-format model: "
                             "DreamBooth-LoRA only; default: the embedded mini-SD).")
    parser.add_argument("--concepts", type=Path, default=None, help="Folder of concept photo folders (with --config).")
    parser.add_argument("--clip", default=None, help="Local CLIP folder (transformers format) to score with.")
    parser.add_argument("--skip-missing-concepts", action="store_true",
                        help="Run the config's concepts that have photos under --concepts, skip the others.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--keep-weights", action="store_true", help="Keep each run's output folder under OUT/work.")
    parser.add_argument("--no-update-statistics", action="store_true",
                        help="Do not record each step's update statistics (the size and direction of every update of "
                             "the learned weights, which Pflug's rule replays); they are skipped anyway above "
                             "50M learned parameters (a full DreamBooth UNet), as they keep 3 float64 copies of them.")
    parser.add_argument("--no-report", action="store_true", help="Do not write the report when the benchmark completes.")
    parser.add_argument("--traces-only", action="store_true",
                        help="Only the trajectories (training, identity checks and every-step loss to the budget, the "
                             "budget scored with its retest, where each rule stops): what benchmarks/rules.py replays, "
                             "e.g. for --lr-scale runs; no premature controls, variant scores, ablation or few iters.")
    return parser


def resolve(args: argparse.Namespace) -> Tuple[BenchmarkConfig, Dict[str, List[ConceptSpec]], Dict[str, Any]]:
    """The config, each method's concepts, and the config file's extra fields."""
    if args.config and args.preset:
        raise ValueError("pass --preset or --config, not both")
    extra: Dict[str, Any] = {}
    if args.config:
        if not args.config.is_file():
            raise ValueError(f"--config {args.config} does not exist")
        extra = json.loads(args.config.read_text())
        cfg = load_config(args.config)
    else:
        cfg = preset(args.preset or "quick")
    if args.model == "mini-flow":
        from dvar.models import mini_flow

        args.model, args.model_label = str(mini_flow()), "mini-flow (embedded)"
    if args.model and model_family(args.model) == "flux":
        if args.methods and "dreambooth_lora" not in args.methods:
            raise ValueError(f"--model {args.model} is a Flux model, which only DreamBooth-LoRA trains: "
                             "pass --methods dreambooth_lora")
        cfg = for_flow_model(cfg)
    if args.methods:
        cfg.methods = [m for m in cfg.methods if m.method in args.methods]
        if not cfg.methods:
            raise ValueError(f"--methods {args.methods}: none of them is in this benchmark")
    if args.concepts_per_method is not None:
        cfg.concepts_per_method = args.concepts_per_method
    if args.lr_scale != 1.0:
        if not (args.lr_scale > 0 and math.isfinite(args.lr_scale)):
            raise ValueError(f"--lr-scale must be a positive number (got {args.lr_scale})")
        for settings in cfg.methods:
            settings.learning_rate *= args.lr_scale
        cfg.name = f"{cfg.name}-lr{args.lr_scale:g}"
    if "concepts" in extra:
        if args.concepts is None or args.model is None:
            raise ValueError(f"{args.config} lists photo concepts: pass --concepts DIR (their folders) and --model PATH")
        pool = folder_concepts(extra["concepts"], args.concepts, extra["identity_prompts"], extra["eval_prompts"],
                               skip_missing=args.skip_missing_concepts)
        concepts = {m.method: pool for m in cfg.methods}
    else:
        root = args.world_concepts
        if root is None and cfg.concept_objects != "held_out":
            root = ensure_world_concepts(args.out / "concepts", cfg.seed, cfg.concept_objects)
        concepts = {
            m.method: bundled_concepts(GROUP_OF_METHOD[m.method] if cfg.concept_source == "group" else None, root)
            for m in cfg.methods
        }
    if cfg.concepts_per_method is not None:
        concepts = {m: c[: cfg.concepts_per_method] for m, c in concepts.items()}
    cfg.validate()
    return cfg, concepts, extra


def concepts_from_meta(out: Path, meta: Dict[str, Any]) -> Dict[str, List[ConceptSpec]]:
    """Each method's concepts of a finished (or running) benchmark, rebuilt from its ``benchmark.json``."""
    names: Dict[str, List[str]] = meta.get("concepts", {})
    if meta.get("photo_concepts"):
        photo = meta["photo_concepts"]
        extra = json.loads(Path(photo["config"]).read_text())
        pool = {c.name: c for c in folder_concepts(extra["concepts"], Path(photo["root"]), extra["identity_prompts"],
                                                   extra["eval_prompts"], skip_missing=True)}
    else:
        root = Path(out) / "concepts"
        pool = {c.name: c for c in bundled_concepts(None, root if (root / "index.json").is_file() else None)}
    missing = sorted({n for method_names in names.values() for n in method_names} - set(pool))
    if missing:
        raise FileNotFoundError(f"{out}: the benchmark's concepts {missing[:5]} are not where it found them")
    return {method: [pool[n] for n in method_names] for method, method_names in names.items()}


def ensure_world_concepts(folder: Path, seed: int, objects: str) -> Path:
    """The synthetic concept set ``(seed, objects)`` in ``folder``, written once (atomically: shards may race)."""
    from dvar_lab.world.concepts import write_concepts

    if not (folder / "index.json").is_file():
        staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        write_concepts(staging, seed, objects)
        try:
            os.replace(staging, folder)
        except OSError:  # another shard was first: its set is the same
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def merged_description(previous: Dict[str, Any], description: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """``previous`` with ``description``'s methods added, or None when they are different benchmarks.

    ``--methods`` runs one benchmark a few methods at a time (e.g. one method's shards, then the next), so two
    descriptions belong together when every setting other than the method list is equal and every method they share
    has equal settings and concepts. The union lists methods in ``METHOD_ORDER``.

    >>> a = {"config": {"methods": [{"method": "textual_inversion"}], "seed": 1},
    ...      "concepts": {"textual_inversion": ["x"]}}
    >>> b = {"config": {"methods": [{"method": "dreambooth_lora"}], "seed": 1}, "concepts": {"dreambooth_lora": ["y"]}}
    >>> [m["method"] for m in merged_description(b, a)["config"]["methods"]]
    ['textual_inversion', 'dreambooth_lora']
    """
    old_config, new_config = previous.get("config", {}), description["config"]

    def shared(config: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in config.items() if k != "methods"}

    if shared(old_config) != shared(new_config):
        return None
    for key in ("lr_scale", "model", "scorer"):
        if key in previous and key in description and previous[key] != description[key]:
            return None
    if previous.get("traces_only", False) != description.get("traces_only", False):
        return None
    methods = {m["method"]: m for m in old_config.get("methods", [])}
    concepts = dict(previous.get("concepts", {}))
    for settings in new_config["methods"]:
        name = settings["method"]
        if name in methods and (methods[name] != settings or concepts.get(name) != description["concepts"].get(name)):
            return None
        methods[name] = settings
        concepts[name] = description["concepts"][name]
    order = sorted(methods, key=lambda name: METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER))
    merged = dict(previous)
    merged["config"] = {**old_config, "methods": [methods[name] for name in order]}
    merged["concepts"] = {name: concepts[name] for name in order}
    budgets = {**previous.get("methods", {}), **description.get("methods", {})}
    merged["methods"] = {name: budgets[name] for name in order if name in budgets}
    return merged


def check_same_benchmark(out: Path, description: Dict[str, Any]) -> None:
    """Write ``out/benchmark.json``, or check that ``out`` holds this benchmark (adding ``--methods`` runs' methods)."""
    path = out / "benchmark.json"
    description = json.loads(json.dumps(description))  # tuples -> lists, as stored
    if not path.is_file():
        write_json(path, description)
        return
    previous = json.loads(path.read_text())
    merged = merged_description(previous, description)
    if merged is None:
        raise ValueError(f"{out} holds a benchmark with other settings; resume it with the same flags or use another --out")
    if merged != previous:
        write_json(path, merged)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        cfg, concepts, extra = resolve(args)
        if args.clip is None and "concepts" in extra:
            raise ValueError("photo concepts are scored with a local CLIP: pass --clip PATH")
        description = {
            "preset": cfg.name, "config": cfg.to_json(), "concepts": {m: [c.name for c in cs] for m, cs in concepts.items()},
            "model": getattr(args, "model_label", None) or args.model or "mini-SD (embedded)", "scorer": "clip" if args.clip else "world",
            "command": "python -m benchmarks.personalization.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine_description(),
            "methods": {m.method: {"max_train_steps": m.max_train_steps, "learning_rate": m.learning_rate}
                        for m in cfg.methods},
            "lr_scale": args.lr_scale,
            "traces_only": args.traces_only,
        }
        if "concepts" in extra:  # photo concepts: where they are, so that saved weights can be rescored
            description["photo_concepts"] = {"config": str(args.config.resolve()), "root": str(args.concepts.resolve())}
        args.out.mkdir(parents=True, exist_ok=True)
        check_same_benchmark(args.out, description)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    quiet_libraries()
    from .scoring import ClipScorer, WorldScorer

    scorer = ClipScorer(args.clip) if args.clip else WorldScorer()
    bench = Benchmark(cfg, args.out, concepts, scorer, model=args.model, keep_weights=args.keep_weights,
                      traces_only=args.traces_only, update_statistics=not args.no_update_statistics)
    started = time.perf_counter()
    try:
        complete = bench.run(args.shard)
    except JobInterrupted as stopped:
        print(f"interrupted during {stopped.job} (exit {stopped.code}): finished jobs are kept; run the same command "
              "again to resume", file=sys.stderr)
        return stopped.code
    print(f"shard {args.shard[0]}/{args.shard[1]} done in {(time.perf_counter() - started) / 60:.1f} min")
    if args.traces_only:
        print(f"trajectories only: compare stopping rules with python benchmarks/rules.py {args.out}")
    elif complete and not args.no_report:
        from .report import write_report

        print(f"report: {write_report(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
