"""The 48-concept benchmark runner: one trajectory per (concept, method), five stopping rules on it,
records written as jobs finish, shards and resuming; weights kept at every check and rescored bit for bit;
every live rule replayed from the recorded losses; the Stable-Diffusion path with a local CLIP."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from benchmarks.personalization import replay, rescore
from benchmarks.personalization import run as bench
from benchmarks.personalization.config import PREMATURE_STOPS, VARIANTS, BenchmarkConfig, load_config, preset
from benchmarks.personalization.report import load_records, load_traces
from dvar.rules import first_stop_step
from dvar.stride import evaluations_in_window

REPO = Path(__file__).resolve().parents[1]
CI_METHODS = ("textual_inversion", "dreambooth_lora", "custom_diffusion")


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    """The ci preset run as two shards; the first shard's few-iters waits until the second is done."""
    out = tmp_path_factory.mktemp("bench") / "ci"
    for shard in ("1/2", "2/2", "1/2"):
        assert bench.main(["--preset", "ci", "--out", str(out), "--shard", shard, "--no-report"]) == 0
    return out


def test_every_method_gets_every_variant(ci_run):
    """The rules, the budget, and the premature controls (step 0, 10% and 25% of the budget), all from one run."""
    records = load_records(ci_run)
    assert sorted((r["method"], r["variant"]) for r in records) == sorted((m, v) for m in CI_METHODS for v in VARIANTS)


@pytest.mark.parametrize("variant, steps", [("step0", 0), ("early10", 4), ("early25", 10), ("baseline", 40)])
def test_premature_controls_stop_where_they_say(ci_run, variant, steps):
    for r in load_records(ci_run):
        if r["variant"] == variant:
            assert r["steps"] == steps
            assert (r["alignment"] is None) == (variant in PREMATURE_STOPS), "controls are scored for identity only"


def test_each_variant_costs_its_own_steps_and_rule(ci_run):
    for r in load_records(ci_run):
        assert 0 <= r["steps"] <= r["max_train_steps"] == 40
        assert r["wall_time_s"] == pytest.approx(r["setup_s"] + r["train_s"] + r["monitor_s"] + r["save_s"], abs=0.01)
        assert (r["monitor_s"] > 0) == (r["variant"] in ("clip_s", "dvar", "dvar_every1", "auto"))
        assert 0 <= r["identity"] <= 1 and -1 <= r["identity_embedding"] <= 1  # look probability; cosine
        if r["variant"] not in PREMATURE_STOPS:
            assert 0 <= r["alignment"] <= 1 and set(r["alignment_by_attribute"]) == {"background", "size"}
        if r["variant"] == "baseline":
            assert r["steps"] == 40 and r["stop_reason"] == "budget"
            assert 0 <= r["identity_retest"] <= 1 and r["identity_retest"] != r["identity"]  # another sampling seed


def test_no_wall_clock_speedup_exceeds_its_step_speedup(ci_run):
    """Each step at the trajectory's median step time: changing load cannot make an early stop look faster."""
    records = load_records(ci_run)
    budgets = {r["method"]: r for r in records if r["variant"] == "baseline"}
    for r in records:
        base = budgets[r["method"]]
        assert r["train_s"] == pytest.approx(base["train_s"] * r["steps"] / 40, abs=0.002)
        if r["steps"]:
            assert base["wall_time_s"] / r["wall_time_s"] <= 40 / r["steps"] * 1.001, r["variant"]


def test_the_rules_fire_where_their_pure_functions_say(ci_run):
    for trace in load_traces(ci_run):
        dvar, every1, checks = trace["dvar"], trace["dvar_variants"]["dvar_every1"], trace["identity_checks"]
        assert trace["informative"] and dvar["steps"] == list(range(4, 41, 4))  # traced: through the budget
        assert dvar["stop_step"] == (
            None if (n := first_stop_step(dvar["eval_loss"], evaluations_in_window(12, 4), dvar["threshold"])) is None
            else 4 * n
        )  # window 12 steps = 3 evaluations
        assert every1["steps"] == list(range(1, 41))
        assert every1["stop_step"] == first_stop_step(every1["eval_loss"], every1["window"], every1["threshold"])
        assert every1["eval_loss"][3::4] == dvar["eval_loss"], "one frozen batch, whatever the stride"
        assert checks["steps"] == [0, 10, 20, 30, 40] and len(checks["identity"]) == len(checks["identity_embedding"])
        assert checks["images"] == 4 and trace["clip_s_checks"]["images"] == 2, "CLIP-s reads the first image set"
        by_variant = {r["variant"]: r for r in load_records(ci_run) if r["method"] == trace["method"]}
        for variant, curve in (("dvar", dvar), ("dvar_every1", every1), ("auto", trace["dvar_variants"]["auto"])):
            assert by_variant[variant]["steps"] == (curve["stop_step"] or 40)
        assert by_variant["clip_s"]["steps"] == (checks["stop_step"] or 40)


def test_replaying_each_live_rule_on_the_recorded_losses_gives_its_stop(ci_run):
    for trace in load_traces(ci_run):
        for signal in ("loss", "per_example_mean"):
            rows = replay.check_live_stops(trace, signal)
            assert [r["rule"] for r in rows] == ["dvar", "dvar_every1", "auto", "clip_s"]
            assert all(r["match"] for r in rows), rows
        losses, timesteps = replay.per_example_losses(trace)
        assert losses.shape == (40, len(timesteps)) and len(set(timesteps)) > 1
    assert replay.main([str(ci_run)]) == 0


def test_every_step_records_its_update_and_the_saved_weights_agree(ci_run):
    """The update statistics (Pflug's diagnostic reads them) are the saved weights' own: |w_s - w_0|^2 at each
    saved step s equals the recorded displacement, and each step's |u_t|^2 adds up with the cross terms."""
    for trace in load_traces(ci_run):
        updates, budget = trace["updates"], trace["max_train_steps"]
        assert [len(updates[k]) for k in ("sq", "dot_previous", "displacement_sq")] == [budget] * 3
        assert updates["dot_previous"][0] is None and all(x is not None for x in updates["dot_previous"][1:])
        assert updates["displacement_sq"][0] == pytest.approx(updates["sq"][0]) and max(updates["sq"]) > 0
        # |w_2 - w_0|^2 = |u_1|^2 + |u_2|^2 + 2 u_1.u_2
        two = updates["sq"][0] + updates["sq"][1] + 2 * updates["dot_previous"][1]
        assert updates["displacement_sq"][1] == pytest.approx(two, rel=1e-9, abs=1e-30)
        folder = ci_run / trace["weights"]["folder"]
        start = load_file(str(folder / "step_00000.safetensors"))
        for step in trace["weights"]["steps"][1:]:
            weights = load_file(str(folder / f"step_{step:05d}.safetensors"))
            moved = sum(float(((weights[k].double() - start[k].double()) ** 2).sum()) for k in start)
            assert updates["displacement_sq"][step - 1] == pytest.approx(moved, rel=1e-9, abs=1e-30), (trace["method"], step)


def test_weights_are_kept_at_every_check_and_every_stop(ci_run):
    for trace in load_traces(ci_run):
        stops = {r["steps"] for r in load_records(ci_run) if r["method"] == trace["method"]}
        steps = rescore.saved_steps(ci_run / trace["weights"]["folder"])
        assert steps == trace["weights"]["steps"] and trace["weights"]["bytes"] > 0
        assert set(trace["identity_checks"]["steps"]) | stops == set(steps)


def test_rescoring_saved_weights_repeats_every_score_bit_for_bit(ci_run):
    """The TI concept's variants rescored from their saved weights with the run's own seed give the run's scores."""
    argv = [str(ci_run), "--name", "same", "--steps", "variants", "--methods", "textual_inversion"]
    assert rescore.main(argv) == 0
    [path] = (ci_run / "rescored" / "same" / "textual_inversion").glob("*.json")
    again = json.loads(path.read_text())
    for r in load_records(ci_run):
        if r["method"] == "textual_inversion":
            assert again["steps"][str(r["steps"])]["identity"] == r["identity"], r["variant"]
    assert rescore.main(argv) == 0, "a finished rescoring resumes to nothing"
    assert rescore.main([*argv[:3], "--steps", "x"]) == 2


def test_few_iters_is_the_trajectory_at_the_mean_clip_s_stop(ci_run):
    """One concept per method: the mean CLIP-s stop is its own (a check step), so few iters is CLIP-s's weights,
    scored again from the saved file (the same score) and timed on the trajectory up to that step."""
    by = {(r["method"], r["variant"]): r for r in load_records(ci_run)}
    for method in CI_METHODS:
        few, clip_s = by[(method, "few_iters")], by[(method, "clip_s")]
        assert few["steps"] == clip_s["steps"] and few["identity"] == clip_s["identity"]
        # timed from the trace (its step times rounded to 10 us): the same training time as CLIP-s's stop
        assert few["train_s"] == pytest.approx(clip_s["train_s"], abs=0.01) and few["monitor_s"] == 0


def test_ablation_tracks_the_frozen_and_the_redrawn_batch(ci_run):
    (trace,) = [t for t in load_traces(ci_run) if t["method"] == "textual_inversion"]
    assert set(trace["ablation"]) == {"none", "timesteps"}
    assert trace["ablation"]["none"]["eval_loss"] == trace["dvar"]["eval_loss"]
    assert trace["ablation"]["timesteps"]["eval_loss"] != trace["dvar"]["eval_loss"]


def test_a_finished_benchmark_resumes_to_nothing_and_writes_the_report(ci_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in (ci_run / "records").rglob("*.json")}
    assert bench.main(["--preset", "ci", "--out", str(ci_run)]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (ci_run / "records").rglob("*.json")} == before
    report = (ci_run / "report" / "report.md").read_text()
    assert "| textual_inversion | dvar |" in report
    assert not (ci_run / "work").exists() or not any((ci_run / "work").rglob("*.safetensors"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "quick"], "other settings"),  # the folder holds the ci benchmark
        (["--preset", "ci", "--config", "x.json"], "not both"),
        (["--config", str(REPO / "benchmarks/personalization/paper48.json")], "--concepts DIR"),
        (["--preset", "ci", "--lr-scale", "0"], "--lr-scale must be a positive number"),
        (["--preset", "ci", "--lr-scale", "2"], "other settings"),  # another learning rate: another folder
    ],
)
def test_bad_settings_exit_2_with_the_fix(ci_run, capsys, argv, message):
    assert bench.main([*argv, "--out", str(ci_run)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "enabled, parameters, cap, kept",
    [
        (True, 10, 10, True),  # at the cap: kept
        (True, 11, 10, False),  # above it (a full DreamBooth UNet): three float64 copies would not fit
        (False, 1, 10, False),  # --no-update-statistics
    ],
)
def test_update_statistics_are_kept_up_to_a_size(enabled, parameters, cap, kept):
    from benchmarks.personalization.monitors import update_statistics

    start = {"a": torch.zeros(parameters - parameters // 2), "b": torch.zeros(parameters // 2)}
    assert (update_statistics(start, enabled=enabled, max_parameters=cap) is not None) == kept


def _described(methods, lr=None, seed=0, lr_scale=1.0):
    """The part of a benchmark.json that check_same_benchmark compares, for the named methods."""
    cfg = preset("full")
    cfg.methods = [m for m in cfg.methods if m.method in methods]
    if lr is not None:
        cfg.methods[0].learning_rate = lr
    cfg.seed = seed
    return {"config": cfg.to_json(), "concepts": {m: [f"{m}-concept"] for m in methods},
            "methods": {m: {} for m in methods}, "lr_scale": lr_scale, "traces_only": False}


@pytest.mark.parametrize(
    "first, then, stored",
    [
        # one method's shards, then another's: the folder holds their union, in METHOD_ORDER
        (["dreambooth_lora"], ["textual_inversion"], ["textual_inversion", "dreambooth_lora"]),
        (["textual_inversion"], ["textual_inversion", "custom_diffusion"], ["textual_inversion", "custom_diffusion"]),
        # the final run with every method resumes a folder built method by method
        (["textual_inversion", "dreambooth_lora", "custom_diffusion"], ["dreambooth_lora"],
         ["textual_inversion", "dreambooth_lora", "custom_diffusion"]),
    ],
)
def test_methods_run_one_at_a_time_share_one_benchmark(tmp_path, first, then, stored):
    bench.check_same_benchmark(tmp_path, _described(first))
    bench.check_same_benchmark(tmp_path, _described(then))
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert [m["method"] for m in saved["config"]["methods"]] == stored
    assert list(saved["concepts"]) == stored
    bench.check_same_benchmark(tmp_path, _described(stored))  # and the union is the same benchmark


@pytest.mark.parametrize(
    "then",
    [
        _described(["textual_inversion"], lr=1e-2),  # a shared method with other settings
        _described(["dreambooth_lora"], seed=1),  # another benchmark-wide setting
        _described(["dreambooth_lora"], lr_scale=2.0),  # another learning-rate scale
    ],
    ids=["method-settings", "seed", "lr-scale"],
)
def test_methods_of_another_benchmark_are_refused(tmp_path, then):
    bench.check_same_benchmark(tmp_path, _described(["textual_inversion"]))
    before = (tmp_path / "benchmark.json").read_text()
    with pytest.raises(ValueError, match="other settings"):
        bench.check_same_benchmark(tmp_path, then)
    assert (tmp_path / "benchmark.json").read_text() == before


def test_a_bad_shard_is_refused():
    with pytest.raises(SystemExit) as error:
        bench.main(["--preset", "ci", "--out", "unused", "--shard", "3/2"])
    assert error.value.code == 2


def test_missing_photo_folders_are_named(tmp_path, capsys):
    (tmp_path / "photos" / "dog").mkdir(parents=True)
    argv = ["--config", str(REPO / "benchmarks/personalization/paper48.json"), "--model", str(tmp_path),
            "--concepts", str(tmp_path / "photos"), "--clip", str(tmp_path), "--out", str(tmp_path / "out")]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert "47 concept(s) have no photo folder" in err and "--skip-missing-concepts" in err


def test_the_paper_config_lists_48_concepts_in_the_9_9_30_split():
    data = json.loads((REPO / "benchmarks/personalization/paper48.json").read_text())
    groups = [c["group"] for c in data["concepts"]]
    assert (groups.count("textual_inversion"), groups.count("custom_diffusion"), groups.count("dreambooth")) == (9, 9, 30)
    assert len({c["name"] for c in data["concepts"]}) == 48
    cfg = load_config(REPO / "benchmarks/personalization/paper48.json")
    budgets = {m.method: (m.max_train_steps, m.clip_s_eps, m.clip_s_patience) for m in cfg.methods}
    assert budgets == {"textual_inversion": (6100, 0.02, 6), "dreambooth_lora": (1000, 0.04, 3),
                       "custom_diffusion": (500, 0.02, 6)}


@pytest.mark.parametrize("name", ["ci", "quick", "full"])
def test_presets_survive_a_json_round_trip(name):
    cfg = preset(name)
    assert BenchmarkConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg


def test_the_full_preset_is_48_concepts_by_3_methods():
    from benchmarks.personalization.scoring import bundled_concepts

    cfg = preset("full")
    assert [m.method for m in cfg.methods] == list(CI_METHODS) and cfg.concept_source == "all"
    assert len(bundled_concepts()) == 48


# -- Stable Diffusion format, photo folders and a local CLIP ------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dvar.models import mini_sd

    path = tmp_path_factory.mktemp("tiny-clip")
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    tokenizer = CLIPTokenizer.from_pretrained(Path(mini_sd()) / "tokenizer")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def test_photo_concepts_on_an_sd_format_model_scored_by_clip(tmp_path, tiny_pipeline_dir, tiny_clip_dir):
    photos = tmp_path / "photos" / "red_mug"
    photos.mkdir(parents=True)
    for i, size in enumerate([(40, 30), (30, 40), (32, 32)]):
        Image.new("RGB", size, (200 + i * 20, 30, 30)).save(photos / f"{i}.jpg")
    config = {
        "benchmark": {
            "name": "sd-smoke", "concept_source": "all", "traced_per_method": 1,
            "methods": [{"method": "textual_inversion", "max_train_steps": 8, "learning_rate": 1e-3,
                         "check_every": 4, "clip_s_patience": 1, "dvar_window": 3, "dvar_threshold": 0.9}],
            "sampling": {"num_inference_steps": 2, "images_per_prompt": 1, "identity_images_per_prompt": 1,
                         "check_images_per_prompt": 1},
        },
        "identity_prompts": ["a photo of a {}"],
        "eval_prompts": ["a {} on the beach", "a {} in the snow"],
        "concepts": [{"name": "red_mug", "group": "textual_inversion", "class_word": "mug"}],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = ["--config", str(tmp_path / "config.json"), "--model", str(tiny_pipeline_dir),
            "--concepts", str(tmp_path / "photos"), "--clip", str(tiny_clip_dir), "--out", str(out)]
    assert bench.main(argv) == 0
    records = load_records(out)
    assert sorted(r["variant"] for r in records) == sorted(VARIANTS)
    for r in records:
        assert -1 <= r["identity"] <= 1 and r["identity"] == r["identity_embedding"]  # CLIP-I is both
        assert r["alignment"] is None or -1 <= r["alignment"] <= 1
    assert json.loads((out / "benchmark.json").read_text())["scorer"] == "clip"
    assert (out / "report" / "report.md").is_file()


def test_clip_alignment_ignores_the_identifier(tiny_clip_dir):
    from benchmarks.personalization.scoring import ClipScorer, EvalPrompt

    prompt = EvalPrompt("a {} on the beach", class_word="mug")
    assert prompt.text_without_concept() == "a mug on the beach"
    scorer = ClipScorer(str(tiny_clip_dir))
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    score, by_attribute = scorer.alignment([image], [prompt])
    assert -1 <= score <= 1 and by_attribute == {}


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth_lora", "custom_diffusion", "dreambooth"])
def test_learned_state_round_trips(tmp_path, tiny_pipeline_dir, concept_dir, method):
    """The snapshot a rule's stop keeps is exactly what training changed, and loads back."""
    import torch

    from benchmarks.personalization.scoring import bundled_concepts
    from dvar.integrations.trainer import TrainingObserver, main as train_main

    class Grab(TrainingObserver):
        def on_step_end(self, trainer, global_step, loss):
            self.trainer = trainer
            if global_step == 1:
                self.state = trainer.method.learned_state(trainer.parts, trainer.accelerator)

    concept = [c for c in bundled_concepts() if c.path == concept_dir][0]
    _, argv = bench.concept_arguments(method, concept)
    grab, instance = Grab(), bench.method_instance(method)
    argv += ["--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--max_train_steps", "3", "--output_dir",
             str(tmp_path / "out"), "--num_validation_images", "0", "--learning_rate", "1e-2"]
    assert train_main(instance, argv, callbacks=[grab]) == 0
    parts, accelerator = grab.trainer.parts, grab.trainer.accelerator
    after = instance.learned_state(parts, accelerator)
    assert set(after) == set(grab.state) and len(after) > 0
    assert any(not torch.equal(after[k], grab.state[k]) for k in after)  # steps 2-3 changed it
    if method in ("textual_inversion", "custom_diffusion"):  # only the new token's row, not the whole table
        (row,) = [v for k, v in after.items() if "token_embedding" in k]
        assert row.shape[0] == 1
    instance.load_learned_state(grab.state, parts, accelerator)
    assert all(torch.equal(instance.learned_state(parts, accelerator)[k], grab.state[k]) for k in after)


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_the_learning_rate_axis_scales_every_method(scale, tmp_path):
    args = bench.build_parser().parse_args(["--preset", "full", "--lr-scale", str(scale), "--out", str(tmp_path),
                                            "--concepts-per-method", "12"])
    cfg, concepts, _ = bench.resolve(args)
    base = {m.method: m.learning_rate for m in preset("full").methods}
    assert {m.method: m.learning_rate for m in cfg.methods} == {k: v * scale for k, v in base.items()}
    assert cfg.name == f"full-lr{scale:g}" and all(len(c) == 12 for c in concepts.values())


def test_rules_replays_candidates_on_the_recorded_trajectories(ci_run, capsys, tmp_path):
    import benchmarks.rules as rules

    trajectories = rules.load_trajectories(ci_run)
    assert {t.method for t in trajectories} == set(CI_METHODS)
    for t in trajectories:  # the every-step loss and the checks cover the whole budget
        assert len(t.losses) == t.budget and t.check_steps[0] == 0 and t.check_steps[-1] == t.budget
    assert rules.main([str(ci_run), "--csv", str(tmp_path / "cells.csv")]) == 0
    out = capsys.readouterr().out
    assert "### selection half" in out and "| paper (reference) | mini-sd | textual_inversion |" in out
    assert (tmp_path / "cells.csv").read_text().startswith(",".join(rules.COLUMNS))


def test_traces_only_records_what_the_rule_comparison_replays(tmp_path, capsys):
    import benchmarks.rules as rules

    out = tmp_path / "lr2"
    argv = ["--preset", "ci", "--methods", "dreambooth_lora", "--concepts-per-method", "2", "--lr-scale", "2",
            "--traces-only", "--out", str(out)]
    assert bench.main(argv) == 0
    assert "python benchmarks/rules.py" in capsys.readouterr().out
    concept = sorted(out.glob("records/dreambooth_lora/*"))[0]
    variants = {p.stem: json.loads(p.read_text()) for p in concept.glob("*.json")}
    assert set(variants) == {"baseline", "clip_s", "dvar", "dvar_every1", "auto"}  # no controls, no few iters
    saved = set(rescore.saved_steps(out / "weights" / "dreambooth_lora" / concept.name))
    assert {0, 10, 20, 30, 40} <= saved, "the weights at every check are kept: the stops can be scored later"
    assert variants["baseline"]["identity_retest"] is not None and variants["baseline"]["alignment"] is None
    assert variants["dvar"]["identity"] is None and variants["dvar"]["steps"] <= 40
    assert json.loads((out / "benchmark.json").read_text())["lr_scale"] == 2.0
    trajectories = rules.load_trajectories(out)
    assert [(t.method, t.lr_scale, len(t.losses)) for t in trajectories] == [("dreambooth_lora", 2.0, 40)] * 2
    assert {t.half for t in trajectories} == {"selection", "held_out"}
    assert bench.main(argv[:-3] + ["--out", str(out)]) == 2  # the same folder without --traces-only: refused


def test_a_signal_stops_the_benchmark_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    import dvar.integrations.trainer as trainer

    monkeypatch.setattr(trainer, "main", lambda *args, **kwargs: 143)  # the trainer got SIGTERM
    assert bench.main(["--preset", "ci", "--out", str(tmp_path / "out"), "--methods", "textual_inversion"]) == 143
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("records/*/*/dvar.json")), "nothing marks the job done"


# ---- the benchmark on a Flux model (issue 24): mini-flow's path, on a tiny random Flux pipeline -------------------


@pytest.fixture(scope="module")
def flow_ci_run(tmp_path_factory, unguided_flux_pipeline_dir):
    out = tmp_path_factory.mktemp("bench") / "ci-flow"
    assert bench.main(["--preset", "ci", "--model", str(unguided_flux_pipeline_dir), "--out", str(out), "--no-report"]) == 0
    return out


def test_a_flux_model_runs_dreambooth_lora_with_every_variant(flow_ci_run, unguided_flux_pipeline_dir):
    meta = json.loads((flow_ci_run / "benchmark.json").read_text())
    assert meta["preset"] == "ci-flow" and meta["model"] == str(unguided_flux_pipeline_dir)
    records = load_records(flow_ci_run)
    assert sorted(r["variant"] for r in records) == sorted(VARIANTS)
    assert {r["method"] for r in records} == {"dreambooth_lora"}
    (trace,) = load_traces(flow_ci_run)
    assert trace["identity_checks"]["steps"][-1] == trace["max_train_steps"]  # checks drawn by the Flux pipeline
    rows = replay.check_live_stops(trace)  # the flow loss replays to the live stops, as on mini-SD
    assert rows and all(row["match"] for row in rows)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "textual_inversion"], "only DreamBooth-LoRA trains"),
])
def test_a_flux_model_refuses_the_methods_that_cannot_train_it(tmp_path, capsys, unguided_flux_pipeline_dir, argv, message):
    out = tmp_path / "refused"
    assert bench.main(["--preset", "ci", "--model", str(unguided_flux_pipeline_dir), "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("config", ["full", "benchmarks/personalization/lora_rank16.json"])
def test_the_dvar_control_is_each_methods_paper_preset_not_the_trainers_default_rule(config):
    """The benchmark compares the paper's rule with the others: its "dvar" stopper (``make_stopper()`` on the trainer
    flags of the method's settings) must name the paper preset, whatever the trainers' default rule is."""
    from dvar import DVARConfig
    from dvar.integrations.cli import build_parser, dvar_settings, resolve_defaults

    cfg = preset(config) if config == "full" else load_config(Path(__file__).resolve().parent.parent / config)
    for settings in cfg.methods:
        method = bench.method_instance(settings.method)
        args = build_parser(method).parse_args(["--early-stop", *settings.trainer_args()])
        resolve_defaults(method, args)
        rule = DVARConfig(**dvar_settings(args))
        assert (rule.rule_preset, rule.signal, rule.uses_default) == (settings.method, "loss", False)
