"""The default evaluation stride (eval_every="auto"): what k it picks, that the callback with it
stops where the replay says and close to the every-step rule, that it resumes, and that the
trainers and the upstream-script guide use it by default."""

import importlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dvar.callback
from dvar import DVARConfig, DVAREarlyStopping
from dvar.rules import PRESETS, first_stop_step
from dvar.stride import (
    AUTO_EVALS_PER_WINDOW,
    STRIDE_PROBE_STEPS,
    evaluations_in_window,
    resolve_eval_every,
    stride_for_overhead,
    strided_stop_step,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "eval_every, window, expected",
    [
        ("auto", 310, 310 // AUTO_EVALS_PER_WINDOW),  # Textual Inversion
        ("auto", 440, 440 // AUTO_EVALS_PER_WINDOW),  # DreamBooth-LoRA, DreamBooth
        ("auto", 180, 180 // AUTO_EVALS_PER_WINDOW),  # Custom Diffusion
        ("auto", AUTO_EVALS_PER_WINDOW - 1, 1),  # short windows: every step
        ("auto", 2, 1),
        (1, 310, 1),  # the paper's setting
        (7, 310, 7),
        (np.int64(3), 310, 3),
    ],
)
def test_resolve_eval_every(eval_every, window, expected):
    assert resolve_eval_every(eval_every, window) == expected


@pytest.mark.parametrize("bad", [0, -1, "fast", "1", 2.5, True, None])
def test_resolve_eval_every_refuses(bad):
    with pytest.raises(ValueError, match="eval_every must be >= 1"):
        resolve_eval_every(bad, 310)


@pytest.mark.parametrize(
    "window, eval_every, evaluations",
    [(310, 1, 310), (310, 10, 31), (440, 14, 31), (180, 6, 30), (20, 5, 4), (25, 10, 3), (15, 10, 2), (5, 10, 2)],
)
def test_window_in_evaluations_is_the_nearest_count(window, eval_every, evaluations):
    assert evaluations_in_window(window, eval_every) == evaluations


def test_the_default_is_auto_and_summary_records_k(toy_dataset):
    assert DVARConfig().eval_every == "auto"
    stopper = DVAREarlyStopping(objective=lambda m, b: torch.tensor(1.0), train_dataset=toy_dataset, preset="textual_inversion")
    k = 310 // AUTO_EVALS_PER_WINDOW
    assert stopper.eval_every == stopper.config.eval_every == k
    assert stopper.rule.window == evaluations_in_window(310, k)
    summary = stopper.summary()
    assert (summary["eval_every"], summary["eval_every_setting"]) == (k, "auto")


def drive(stopper, trace, start=1, until=None):
    """Call step() for each optimizer step; the objective returns the trace's value at that step."""
    current = {}
    stopper.objective = lambda models, batch: torch.tensor(trace[current["step"] - 1], dtype=torch.float64)
    for step in range(start, (until or len(trace)) + 1):
        current["step"] = step
        if stopper.step(step):
            return step
    return None


def planted(n, tau, noise, seed):
    """A frozen-batch-loss-like trace: an exponential fall to a plateau, plus small noise."""
    t = np.arange(1, n + 1)
    return list(0.02 + 0.01 * np.exp(-t / tau) + noise * np.random.RandomState(seed).randn(n))


STEPS = np.arange(1, 1001)
# (trace, how many strides k the stop may move). On falls spread over many steps the stride only
# rounds the stop to a multiple of k. When most of the variance sits in the first few steps (a
# 1/sqrt(t) fall), the evaluations at k, 2k, ... miss it, var(all) comes out smaller and the
# stop later. Noise can also dip the ratio below the threshold between two evaluations. Real
# traces: benchmarks/stride.py (benchmarks/results/stride.md).
PLANTED = {
    "exp fall, tau 30": (list(0.02 + 0.01 * np.exp(-STEPS / 30)), 1),
    "exp fall, tau 60": (planted(1000, 60, 0.0, 0), 1),
    "exp fall, tau 200": (planted(1000, 200, 0.0, 0), 1),
    "exp fall, tau 300": (list(0.02 + 0.01 * np.exp(-STEPS / 300)), 1),
    "linear fall, then flat": (list(0.02 + 0.01 * np.clip(1 - STEPS / 400, 0, None)), 1),
    "two phases": (list(0.02 + 0.006 * np.exp(-STEPS / 30) + 0.004 * np.exp(-STEPS / 250)), 2),
    "1/sqrt(t) fall": (list(0.02 + 0.01 / np.sqrt(STEPS)), 3),
    "exp fall + noise": (planted(1000, 150, 1e-4, 3), 2),
}


@pytest.mark.parametrize("preset", ["textual_inversion", "dreambooth_lora", "custom_diffusion"])
@pytest.mark.parametrize("shape", sorted(PLANTED))
def test_auto_stride_fires_within_k_steps_of_the_every_step_rule(toy_dataset, preset, shape):
    trace, strides = PLANTED[shape]
    window, threshold = PRESETS[preset].window, PRESETS[preset].threshold
    stopper = DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, preset=preset)
    k = stopper.eval_every
    assert k == resolve_eval_every("auto", window) > 1
    stop = drive(stopper, trace)
    every_step = first_stop_step(trace, window, threshold)
    assert stop is not None and every_step is not None
    assert stop % k == 0 and abs(stop - every_step) <= strides * k
    assert stop == strided_stop_step(trace, window, threshold, k)  # the replay is exactly the callback
    assert [row.step for row in stopper.history] == list(range(k, stop + 1, k))


@pytest.mark.parametrize("interrupt_at", [37, 200, 455])
def test_auto_stride_is_deterministic_and_resumes_mid_run(toy_dataset, interrupt_at):
    trace = planted(1000, 150, 1e-4, 3)
    make = lambda: DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, preset="dreambooth_lora")
    first, second = make(), make()
    stop = drive(first, trace)
    assert stop is not None and drive(second, trace) == stop
    assert [(r.step, r.eval_loss, r.statistic) for r in first.history] == [
        (r.step, r.eval_loss, r.statistic) for r in second.history
    ]

    interrupted = make()
    assert drive(interrupted, trace, until=interrupt_at) is None
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)  # as accelerate's save_state pickles it
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert drive(resumed, trace, start=interrupt_at + 1) == stop
    assert [(r.step, r.eval_loss) for r in resumed.history] == [(r.step, r.eval_loss) for r in first.history]
    assert resumed.summary() | {"eval_seconds": 0} == first.summary() | {"eval_seconds": 0}


def test_auto_resumes_with_the_checkpoints_stride_an_explicit_one_must_match(toy_dataset):
    trace = planted(600, 100, 0.0, 0)
    objective = lambda m, b: torch.tensor(0.0)
    old = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, preset="custom_diffusion", eval_every=4)
    drive(old, trace, until=120)
    state = old.state_dict()

    auto = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, preset="custom_diffusion")
    assert auto.eval_every != 4
    auto.load_state_dict(state)  # e.g. a checkpoint written before the library's "auto" changed
    assert auto.eval_every == 4 and auto.rule.window == evaluations_in_window(180, 4)
    assert drive(auto, trace, start=121) == strided_stop_step(trace, 180, 0.15, 4)

    explicit = DVAREarlyStopping(objective=objective, train_dataset=toy_dataset, preset="custom_diffusion", eval_every=6)
    with pytest.raises(ValueError, match="eval_every is 4 but this run uses 6"):
        explicit.load_state_dict(state)


def test_history_csv_records_the_stride(toy_dataset, tmp_path):
    stopper = DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, window=90, threshold=1e-9)
    drive(stopper, planted(30, 10, 0.0, 0))
    (csv,) = stopper.save_history(str(tmp_path), plot=False, summary=False)
    lines = [line.split(",") for line in csv.read_text().splitlines()]
    column = lines[0].index("eval_every")
    assert [line[column] for line in lines[1:]] == ["3"] * 10


# -- a target overhead instead: eval_every="5%" (an option, timed, not the default) ------------


@pytest.mark.parametrize("eval_seconds, step_seconds, target, k", [
    (0.040, 0.100, 0.05, 8),  # mini-SD: an evaluation costs ~40% of a training step
    (0.040, 0.100, 0.10, 4),
    (0.041, 0.100, 0.05, 9),  # rounds up: the target is a ceiling
    (0.004, 0.100, 0.05, 1),  # cheaper than the target even at every step
    (0.300, 0.150, 0.05, 40),
    (0.000, 0.100, 0.05, 1),
])
def test_stride_for_overhead(eval_seconds, step_seconds, target, k):
    assert stride_for_overhead(eval_seconds, step_seconds, target) == k


@pytest.mark.parametrize("bad", ["0%", "-5%", "150%", "fast%", "%"])
def test_a_bad_target_overhead_is_refused(toy_dataset, bad):
    with pytest.raises(ValueError, match=r"percentage in \(0, 100\]"):
        DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, preset="custom_diffusion",
                          eval_every=bad)


class FakeClock:
    """time.perf_counter for dvar.callback: the test decides what a training step and an evaluation cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timed_drive(stopper, trace, clock, step_seconds, eval_seconds, start=1, until=None):
    current = {}

    def objective(models, batch):
        clock.now += eval_seconds
        return torch.tensor(trace[current["step"] - 1], dtype=torch.float64)

    stopper.objective = objective
    for step in range(start, (until or len(trace)) + 1):
        clock.now += step_seconds  # the training step before this call
        current["step"] = step
        if stopper.step(step):
            return step
    return None


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(dvar.callback, "time", SimpleNamespace(perf_counter=fake))
    return fake


def test_a_target_overhead_times_the_first_steps_then_fixes_the_stride(toy_dataset, clock):
    trace = planted(600, 100, 0.0, 0)
    stopper = DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset,
                                preset="custom_diffusion", eval_every="5%")
    assert stopper.eval_every is None, "not chosen before training"
    stop = timed_drive(stopper, trace, clock, step_seconds=0.1, eval_seconds=0.04)
    k, probe_end = 8, STRIDE_PROBE_STEPS + 1
    assert stopper.eval_every == k and stopper.rule.window == evaluations_in_window(180, k)
    first = (probe_end // k + 1) * k  # the first multiple of k after the timed steps
    assert stopper.history[0].step == first and all(row.step % k == 0 for row in stopper.history)
    count = first_stop_step(trace[first - 1::k], evaluations_in_window(180, k), 0.15)
    assert stop == first + (count - 1) * k, "after the probe it is the strided rule, from its first evaluation on"
    summary = stopper.summary()
    assert (summary["eval_every"], summary["eval_every_setting"]) == (k, "5%")
    assert summary["eval_every_timing"] == {"target": 0.05, "eval_seconds": 0.04, "step_seconds": 0.1,
                                            "probe_steps": STRIDE_PROBE_STEPS}


@pytest.mark.parametrize("interrupt_at", [5, 100])
def test_a_timed_stride_is_kept_on_resume_even_on_a_faster_machine(toy_dataset, clock, interrupt_at):
    trace = planted(600, 100, 0.0, 0)
    make = lambda: DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset,
                                     preset="custom_diffusion", eval_every="5%")
    uninterrupted = make()
    stop = timed_drive(uninterrupted, trace, clock, step_seconds=0.1, eval_seconds=0.04)

    interrupted = make()
    assert timed_drive(interrupted, trace, clock, 0.1, 0.04, until=interrupt_at) is None
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed_stop = timed_drive(resumed, trace, clock, step_seconds=0.1, eval_seconds=0.01, start=interrupt_at + 1)
    if interrupt_at > STRIDE_PROBE_STEPS:  # chosen before the checkpoint: kept, whatever this machine's timings
        assert resumed.eval_every == 8 and resumed_stop == stop
        assert [(r.step, r.eval_loss) for r in resumed.history] == [(r.step, r.eval_loss) for r in uninterrupted.history]
        assert resumed.summary()["eval_every_timing"] == uninterrupted.summary()["eval_every_timing"]
    else:  # the checkpoint came before the choice: the resumed run times its own steps
        probe_end = interrupt_at + STRIDE_PROBE_STEPS + 1
        assert resumed.eval_every == 2 and resumed.history[0].step == (probe_end // 2 + 1) * 2


# -- the trainers and the guide use it by default ----------------------------------------


def trainer_parser(module):
    from dvar.integrations.cli import build_parser
    from dvar.integrations.method import Method

    classes = vars(importlib.import_module(f"dvar.integrations.{module}")).values()
    method = next(c for c in classes if isinstance(c, type) and issubclass(c, Method) and c.name == module)
    return build_parser(method())


@pytest.mark.parametrize("module", ["textual_inversion", "dreambooth", "dreambooth_lora", "custom_diffusion"])
def test_trainers_default_to_auto(module):
    parser = trainer_parser(module)
    assert parser.parse_args([]).early_stop_eval_every == "auto"
    assert parser.parse_args(["--early-stop-eval-every", "1"]).early_stop_eval_every == 1
    assert parser.parse_args(["--early_stop_eval_every", "auto"]).early_stop_eval_every == "auto"
    assert parser.parse_args(["--early-stop-eval-every", "5%"]).early_stop_eval_every == "5%"


@pytest.mark.parametrize("value, message", [
    ("0", "'auto', an integer >= 1"), ("-3", "'auto', an integer >= 1"), ("often", "'auto', an integer >= 1"),
    ("2.5", "'auto', an integer >= 1"), ("0%", "a target overhead must be a percentage in (0, 100]"),
])
def test_trainer_refuses_a_bad_stride_with_exit_code_2(value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trainer_parser("textual_inversion").parse_args(["--early-stop-eval-every", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_guide_passes_no_stride_so_it_gets_the_default():
    """docs/diffusers-scripts.md's DVAREarlyStopping(...) lines leave eval_every to the library: "auto"."""
    text = (REPO / "docs" / "diffusers-scripts.md").read_text()
    calls = re.findall(r"\+    stopper = DVAREarlyStopping\(.*?\n\+    \)", text, re.S)
    assert len(calls) == 6  # SD 1.x: TI, DreamBooth, LoRA, Custom Diffusion; SDXL and Flux LoRA
    assert not any("eval_every" in call for call in calls)
    assert "eval_every" not in (REPO / "tests" / "upstream" / "textual_inversion.py").read_text()


# -- benchmarks/stride.py -------------------------------------------------------------------


def test_stride_tool_replays_what_the_callback_decides(tmp_path, toy_dataset, capsys):
    """Traces in the benchmark's layout, made by real stoppers (every step, and every 5 steps as
    a recorded variant); the tool's replay must agree with both, and with itself at k = 1."""
    from benchmarks import stride

    window, threshold = 40, 0.2
    for index, (tau, full) in enumerate([(20, True), (40, False), (60, False)]):
        trace = planted(200, tau, 2e-5, index)
        every_step = DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, window=window, threshold=threshold, eval_every=1)
        every5 = DVAREarlyStopping(objective=lambda m, b: torch.tensor(0.0), train_dataset=toy_dataset, window=window, threshold=threshold, eval_every=5)
        stop1, stop5 = drive(every_step, trace), drive(every5, trace)
        recorded = 200 if full else stop1  # the benchmark records a trace up to its own stop
        data = {
            "concept": f"c{index}", "method": "custom_diffusion", "max_train_steps": 200,
            "dvar": {"steps": list(range(1, recorded + 1)), "eval_loss": trace[:recorded], "eval_every": 1,
                     "window": window, "threshold": threshold, "stop_step": stop1},
            "dvar_variants": {"dvar_every5": {"steps": [r.step for r in every5.history],
                                              "eval_loss": [r.eval_loss for r in every5.history],
                                              "eval_every": 5, "window": window, "threshold": threshold, "stop_step": stop5}},
        }
        path = tmp_path / "traces" / "custom_diffusion" / f"c{index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    assert stride.main([str(tmp_path), "--k", "1", "5", "--markdown", str(tmp_path / "stride.md")]) == 0
    text = capsys.readouterr().out
    assert text == (tmp_path / "stride.md").read_text()
    assert "replay check: 4 recorded stops compared, 0 differ" in text  # 3 every-step stops + c0's every-5 stop
    assert "| 1 (auto) | 40 | 3 | 0 | 0 | +0 .. +0 | 0/3 (0%) | 0 | 0 | 0 |" in text  # k = 1: every concept, nothing moves

    data = json.loads(path.read_text())
    data["dvar_variants"]["dvar_every5"]["eval_loss"][0] += 1e-3
    path.write_text(json.dumps(data))
    stride.main([str(tmp_path), "--k", "1"])
    assert "replay check: 4 recorded stops compared, 1 differ" in capsys.readouterr().out
