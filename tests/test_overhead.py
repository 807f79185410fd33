"""Evaluation-side savings keep DVAR's result identical, and benchmarks/overhead.py times what a
real run pays (no timings are asserted: the machine is shared)."""

import contextlib

import pytest
import torch

from dvar import DVAREarlyStopping
from dvar.callback import eval_mode


@contextlib.contextmanager
def module_eval_then_train(modules):
    """What eval_mode did before: Module.eval(), then Module.train(the top module's mode)."""
    modules = list(modules)
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        self.frozen = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
        self.shared = self.body[0]  # reachable twice

    def train(self, mode=True):  # an overriding train(), as transformers' PreTrainedModel has
        self.train_calls = getattr(self, "train_calls", 0) + 1
        return super().train(mode)


def test_eval_mode_sets_every_submodule_to_eval_and_restores_each_ones_own_mode():
    net, other = Net(), torch.nn.Dropout(0.1)
    net.train()
    net.frozen.eval()  # e.g. a frozen part the user keeps in eval mode
    before = [(m, m.training) for m in [*net.modules(), other]]
    calls = net.train_calls
    with eval_mode([net, other, net.body]):
        assert not any(m.training for m, _ in before)
        assert net.train_calls == calls + 1  # its own train() was called
    assert [(m, m.training) for m, _ in before] == before  # the old way left net.frozen in train mode
    with module_eval_then_train([net]):
        pass
    assert net.frozen.training  # (what the old way did)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_loss_is_the_same_as_with_module_eval(sd_parts, toy_dataset, dropout, monkeypatch):
    import dvar.callback

    unet = sd_parts["unet"]  # shared by the session: every change is undone by monkeypatch
    for module in unet.modules():
        monkeypatch.setattr(module, "training", True)
        if isinstance(module, torch.nn.Dropout):
            monkeypatch.setattr(module, "p", dropout)
    common = dict(unet=unet, vae=sd_parts["vae"], text_encoder=sd_parts["text_encoder"], tokenizer=sd_parts["tokenizer"],
                  noise_scheduler=sd_parts["noise_scheduler"], train_dataset=toy_dataset, window=5, threshold=0.1)
    new = [DVAREarlyStopping(**common).evaluate() for _ in range(2)]
    monkeypatch.setattr(dvar.callback, "eval_mode", module_eval_then_train)
    old = DVAREarlyStopping(**common).evaluate()
    assert new == [old, old]
    assert unet.training and all(m.training for m in unet.modules())


def test_models_are_unwrapped_once(toy_dataset, sd_parts):
    class Wrapper(torch.nn.Module):  # as DDP: the stopper must evaluate the inner module
        def __init__(self, module):
            super().__init__()
            self.module = module

    calls = []

    def objective(models, batch):
        calls.append(models["unet"])
        return torch.tensor(1.0)

    stopper = DVAREarlyStopping(models={"unet": Wrapper(sd_parts["unet"])}, objective=objective,
                                train_dataset=toy_dataset, window=3, threshold=0.1)
    for step in (1, 2, 3):
        stopper.step(step)
    assert calls == [sd_parts["unet"]] * 3 and stopper._plain_models == {"unet": sd_parts["unet"]}


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self.tokenizer)


@pytest.mark.parametrize("resample, tokenizations", [((), 1), (("captions",), 3)])
def test_frozen_captions_are_tokenized_once(sd_parts, toy_dataset, resample, tokenizations):
    """While the text encoder trains (its embeddings cannot be cached), its token ids can."""
    tokenizer = CountingTokenizer(sd_parts["tokenizer"])
    assert any(p.requires_grad for p in sd_parts["text_encoder"].parameters())
    stopper = DVAREarlyStopping(unet=sd_parts["unet"], vae=sd_parts["vae"], text_encoder=sd_parts["text_encoder"],
                                tokenizer=tokenizer, noise_scheduler=sd_parts["noise_scheduler"], train_dataset=toy_dataset,
                                window=5, threshold=0.1, resample=resample)
    losses = [stopper.evaluate() for _ in range(3)]
    assert tokenizer.calls == tokenizations
    if not resample:  # the same as tokenizing every time (a batch without a text cache key is)
        from dataclasses import replace

        uncached = replace(stopper.eval_batch.next().shard(0, 1), text_cache_key=None)
        with torch.no_grad(), eval_mode(stopper.models.values()):
            reference = float(stopper.objective(stopper.models, uncached))
        assert tokenizer.calls == 2 and losses == [reference] * 3


# -- benchmarks/overhead.py -----------------------------------------------------------------


class FakeTrainer:
    """What the timer uses of the trainer: make_stopper(**overrides), as Trainer.make_stopper."""

    def __init__(self, dataset, window):
        self.dataset, self.window = dataset, window

    def make_stopper(self, **overrides):
        settings = dict(window=self.window, threshold=0.5, eval_every="auto", max_train_steps=1000)
        settings.update(overrides)
        return DVAREarlyStopping(objective=lambda m, b: torch.tensor(1.0), train_dataset=self.dataset, **settings)


@pytest.mark.parametrize("strides_per_block", [1, 2])
def test_each_timed_block_pays_the_evaluations_of_its_mode(toy_dataset, strides_per_block):
    from benchmarks.overhead import MODES, InterleavedTimer

    trainer, k = FakeTrainer(toy_dataset, window=180), 180 // 30
    block, rounds = strides_per_block * k, 4
    timer = InterleavedTimer(block, warmup_rounds=1)
    timer.on_train_begin(trainer)
    assert timer.eval_every == k and timer.stoppers["every step"].eval_every == 1
    steps = block * len(MODES) * (rounds + 1)
    orders = [tuple(timer.mode(step) for step in range(start, start + block * len(MODES), block))
              for start in range(1, steps + 1, block * len(MODES))]
    assert all(sorted(order) == sorted(MODES) for order in orders) and len(set(orders)) == len(MODES)  # rotated
    for step in range(1, steps + 1):
        timer.on_step_end(trainer, step, torch.tensor(0.0))
    assert {mode: len(seconds) for mode, seconds in timer.seconds.items()} == {mode: rounds for mode in MODES}
    assert len(timer.ratios("default")) == rounds
    steps_per_mode = block * (rounds + 1)  # warm-up round included
    assert len(timer.stoppers["default"].history) == steps_per_mode // k
    assert len(timer.stoppers["every step"].history) == steps_per_mode
    assert not any(s.should_stop for s in timer.stoppers.values())
    assert all(timer.mode(row.step) == "default" and row.step % k == 0 for row in timer.stoppers["default"].history)
