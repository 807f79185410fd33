"""What watching costs: seconds per training step without DVAR, with it at the default stride
(``eval_every="auto"``) and at every step (the paper's setting), side by side in one run.

For each method (the real trainers in ``integrations/`` on the embedded mini-SD, with their
mini-SD learning rates and the method's preset) and training batch size, one training run is
cut into timing blocks that take turns: a block without evaluation, a block in which a stopper
at the default stride evaluates, a block in which one evaluating every step does (the order
rotates from round to round). Background load drifts therefore hit all three alike, and all
three see the same training trajectory. Each block is a whole number of default strides, so a
block pays exactly the evaluations a real run with that stride pays for its steps. The ratio
is the median over rounds of each block's s/step over the same round's block without DVAR. The stoppers are the trainer's own
(``Trainer.make_stopper``) with a threshold that never fires.

    OMP_NUM_THREADS=1 python benchmarks/overhead.py                       # the README table
    python benchmarks/overhead.py --methods textual_inversion --batch-sizes 1 --rounds 2   # quicker
    python benchmarks/overhead.py --model /tmp/random-sd15 --resolution 512 --mixed-precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from dvar.rules import resolve_preset
from dvar.stride import resolve_eval_every
from dvar.integrations.trainer import Trainer, TrainingObserver, main as train_main

METHODS = ("textual_inversion", "dreambooth_lora", "custom_diffusion")
MODES = ("without", "default", "every step")
TARGETS = {1: 1.10, 4: 1.05}  # issue 11: ratio at the default stride, per training batch size


def method_instance(name: str) -> Any:
    from dvar.integrations import custom_diffusion, dreambooth_lora, textual_inversion

    return {
        "textual_inversion": textual_inversion.TextualInversion,
        "dreambooth_lora": dreambooth_lora.DreamBoothLoRA,
        "custom_diffusion": custom_diffusion.CustomDiffusion,
    }[name]()


class InterleavedTimer(TrainingObserver):
    """Runs the three modes in turns of ``block`` optimizer steps and times each block.

    Every round runs each mode for one block, in an order rotated from round to round (so no
    mode always follows the same one); the first ``warmup_rounds`` are not timed."""

    def __init__(self, block: int, warmup_rounds: int = 1) -> None:
        self.block, self.warmup_rounds = block, warmup_rounds
        self.seconds: Dict[str, List[float]] = {mode: [] for mode in MODES}  # s/step of each timed block
        self.stoppers: Dict[str, Any] = {}
        self.block_started = 0.0
        self.eval_every: Optional[int] = None

    def on_train_begin(self, trainer: Trainer) -> None:
        self.stoppers = {
            "default": trainer.make_stopper(threshold=1e-12, max_train_steps=None),  # the trainer's eval_every: auto
            "every step": trainer.make_stopper(threshold=1e-12, max_train_steps=None, eval_every=1),
        }
        self.eval_every = self.stoppers["default"].eval_every
        self.block_started = time.perf_counter()

    def mode(self, step: int) -> str:
        block = (step - 1) // self.block
        round_, position = divmod(block, len(MODES))
        return MODES[(position + round_) % len(MODES)]

    def on_step_end(self, trainer: Trainer, global_step: int, loss: torch.Tensor) -> None:
        mode = self.mode(global_step)
        stopper = self.stoppers.get(mode)
        if stopper is not None:
            stopper.step(global_step, loss)
        if global_step % self.block == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the block's kernels are done
            now = time.perf_counter()
            if global_step > self.warmup_rounds * self.block * len(MODES):
                self.seconds[mode].append((now - self.block_started) / self.block)
            self.block_started = now

    def ratios(self, mode: str) -> List[float]:
        """Per round: s/step of ``mode`` over s/step without DVAR in the same round."""
        return [t / base for t, base in zip(self.seconds[mode], self.seconds["without"])]


def measure(method: str, batch_size: int, rounds: int, block_steps: int, out: str, extra: Sequence[str] = ()) -> Dict[str, Any]:
    preset = resolve_preset(method_instance(method).preset)
    k = resolve_eval_every("auto", preset.window)
    block = k * max(1, math.ceil(block_steps / k))  # a whole number of default strides
    steps = block * len(MODES) * (rounds + 1)  # + one warm-up round
    timer = InterleavedTimer(block)
    argv = [
        "--output_dir", out, "--overwrite_output_dir", "--train_batch_size", str(batch_size),
        "--max_train_steps", str(steps), "--num_validation_images", "0", "--checkpointing_steps", str(steps + 1),
        *extra,
    ]
    started = time.perf_counter()
    code = train_main(method_instance(method), argv, callbacks=[timer])
    if code != 0:
        raise SystemExit(f"error: the {method} trainer exited with {code}")
    assert timer.eval_every == k, (timer.eval_every, k)
    losses = [row.eval_loss for stopper in timer.stoppers.values() for row in stopper.history]
    return {
        "method": method, "batch": batch_size, "k": k, "block": block, "rounds": len(timer.seconds["without"]),
        "seconds": {mode: statistics.median(values) for mode, values in timer.seconds.items()},
        "ratio": {mode: statistics.median(timer.ratios(mode)) for mode in MODES[1:]},
        "ratio_quartiles": {mode: quartiles(timer.ratios(mode)) for mode in MODES[1:]},
        "blocks": timer.seconds, "wall": time.perf_counter() - started,
        "finite_eval_losses": all(map(math.isfinite, losses)), "evaluations": len(losses),
    }


class ProbeDone(Exception):
    pass


class SavingsProbe(TrainingObserver):
    """Per evaluation, what the bit-identical savings remove (timed in turns, 200 times each): eval
    mode by ``Module.eval()``/``train()`` against :func:`dvar.callback.eval_mode`;
    ``accelerator.unwrap_model`` and tokenizing the frozen captions, now done once. Then stops the run."""

    def __init__(self) -> None:
        self.ms: Dict[str, float] = {}
        self.captions = False

    def on_train_begin(self, trainer: Trainer) -> None:
        from dvar.callback import eval_mode

        stopper = trainer.make_stopper(preset=trainer.method.preset, max_train_steps=None, eval_every=1)
        wrapped = list(stopper.models.values())
        plain = [trainer.accelerator.unwrap_model(m) for m in wrapped]
        plain_models = dict(zip(stopper.models, plain))
        for module in plain:
            module.train()

        def module_eval_train() -> None:
            was = [m.training for m in plain]
            for module in plain:
                module.eval()
            for module, training in zip(plain, was):
                module.train(training)

        def flags() -> None:
            with eval_mode(plain):
                pass

        def unwrap() -> None:
            [trainer.accelerator.unwrap_model(m) for m in wrapped]

        from dvar.objectives import _tokenize

        batch = stopper.eval_batch.next()

        def tokenize() -> None:
            if batch.captions is not None:  # the dataset gives caption strings (else token ids: nothing to do)
                _tokenize(trainer.parts.tokenizer, batch.captions)

        probes = {"Module.eval()/train()": module_eval_train, "eval_mode flags": flags, "unwrap_model": unwrap,
                  "tokenize": tokenize}
        times: Dict[str, List[float]] = {name: [] for name in probes}
        for _ in range(200):
            for name, probe in probes.items():
                started = time.perf_counter()
                probe()
                times[name].append(time.perf_counter() - started)
        self.ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
        self.ms["submodules"] = sum(1 for m in plain for _ in m.modules())
        from dvar.objectives import encode_distinct_rows, text_side_trainable

        # the text encoder runs at each evaluation only while a text-side parameter trains (else cached)
        self.captions = batch.captions is not None and text_side_trainable(plain_models, ("text_encoder",))
        if self.captions:  # encoding every caption row against each distinct caption once (same bits)
            encoder, ids = plain_models["text_encoder"], _tokenize(trainer.parts.tokenizer, batch.captions)
            self.ms["distinct captions"] = len(set(batch.captions))
            encoders = {"every row": lambda: encoder(ids, return_dict=False)[0],
                        "distinct rows": lambda: encode_distinct_rows(lambda r: encoder(r, return_dict=False)[0], ids)}
            times = {name: [] for name in encoders}
            with torch.no_grad(), eval_mode(plain):
                for _ in range(30):
                    for name, run in encoders.items():
                        started = time.perf_counter()
                        run()
                        times[name].append(time.perf_counter() - started)
            self.ms.update({f"encode {name}": 1000 * statistics.median(v) for name, v in times.items()})
        raise ProbeDone  # nothing more to time: leave the trainer before its first step


def savings(methods: Sequence[str], extra: Sequence[str]) -> None:
    print("\n| method | submodules | eval mode: Module.eval()/train() | dvar's eval_mode | unwrap_model (now once) "
          "| tokenizing the frozen captions (now once) | text encoder: every caption row / each distinct caption once |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        probe = SavingsProbe()
        with tempfile.TemporaryDirectory() as tmp, contextlib.suppress(ProbeDone):
            train_main(method_instance(method), ["--output_dir", tmp, "--overwrite_output_dir", "--num_validation_images",
                                                 "0", *extra], callbacks=[probe])
        ms = probe.ms
        tokenize = f"{ms['tokenize']:.2f} ms" if probe.captions else "- (prompt embeddings cached)"
        encode = (f"{ms['encode every row']:.1f} ms / {ms['encode distinct rows']:.1f} ms ({ms['distinct captions']:.0f} "
                  "distinct)" if probe.captions else "-")
        print(f"| {method} | {ms['submodules']:.0f} | {ms['Module.eval()/train()']:.2f} ms | {ms['eval_mode flags']:.2f} ms "
              f"| {ms['unwrap_model']:.2f} ms | {tokenize} | {encode} |", flush=True)


def quartiles(values: Sequence[float]) -> List[float]:
    return statistics.quantiles(values, n=4)[::2] if len(values) > 1 else [values[0], values[0]]


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=20, help="timed blocks per mode (after one warm-up round)")
    parser.add_argument("--block-steps", type=int, default=1, help="steps per block, rounded up to a whole default "
                        "stride (default: one stride, the finest interleaving)")
    parser.add_argument("--model", default=None, help="a local diffusers model folder (default: the embedded mini-SD)")
    parser.add_argument("--resolution", type=int, default=None, help="training resolution (default: the model's)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    parser.add_argument("--savings", action="store_true", help="only time the evaluation-side savings, per evaluation")
    args = parser.parse_args(argv)
    extra = [] if args.model is None else ["--pretrained_model_name_or_path", args.model]
    extra += [] if args.resolution is None else ["--resolution", str(args.resolution)]
    extra += [] if args.mixed_precision is None else ["--mixed_precision", args.mixed_precision]
    os.environ.setdefault("TQDM_DISABLE", "1")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    print(f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average before: {load_average()}", flush=True)
    if args.savings:
        savings(args.methods, extra)
        print(f"\nmedian of 200 timings each, taken in turns; load average after: {load_average()}")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            for batch in args.batch_sizes:
                result = measure(method, batch, args.rounds, args.block_steps, os.path.join(tmp, f"{method}-{batch}"), extra)
                results.append(result)
                s, q = result["seconds"], result["ratio_quartiles"]
                print(f"{method} batch {batch}: k={result['k']}, {result['rounds']} rounds of {result['block']}-step "
                      f"blocks, {result['wall']:.0f} s; s/step {s['without']:.4f} / {s['default']:.4f} / "
                      f"{s['every step']:.4f}; ratio quartiles default {q['default'][0]:.3f}-{q['default'][1]:.3f}, "
                      f"every step {q['every step'][0]:.3f}-{q['every step'][1]:.3f}; load average {load_average()}",
                      flush=True)

    print("\n| method | training batch | default k | s/step without | with, default stride | ratio | "
          "with, every step | ratio | target at the default |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s, ratio = r["seconds"], r["ratio"]
        target = TARGETS.get(r["batch"])
        verdict = "-" if target is None else f"<= {target:.2f}: {'met' if ratio['default'] <= target else 'MISSED'}"
        print(f"| {r['method']} | {r['batch']} | {r['k']} | {s['without']:.4f} | {s['default']:.4f} | "
              f"{ratio['default']:.3f} | {s['every step']:.4f} | {ratio['every step']:.3f} | {verdict} |")
    print("\ns/step: median over the timed blocks of each mode; ratio: median over rounds of the block's s/step "
          f"over the same round's block without DVAR (blocks interleaved within one run); load average after: "
          f"{load_average()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    if not all(r["finite_eval_losses"] for r in results):
        print("error: a DVAR evaluation gave a non-finite loss")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
