"""The objective on the frozen batch matches the training objective of each model family."""

import random

import pytest
import torch
import torch.nn.functional as F

from dvar import DVAREarlyStopping, FixedEvalBatch
from dvar.objectives import DiffusionObjective, deterministic_loss
from dvar_lab.tiny import ToyConceptDataset, tiny_sd, tiny_sd3, tiny_sdxl


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sd_objective_matches_training_script(prediction_type):
    parts = tiny_sd(seed=0, prediction_type=prediction_type)
    scheduler, unet, text_encoder = parts["noise_scheduler"], parts["unet"], parts["text_encoder"]
    batch = FixedEvalBatch(ToyConceptDataset(), vae=parts["vae"], noise_scheduler=scheduler).next()
    with torch.no_grad():
        loss = deterministic_loss({"unet": unet, "text_encoder": text_encoder}, batch, scheduler, parts["tokenizer"])
        # what diffusers' train_dreambooth.py computes for the same inputs
        noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        hidden = text_encoder(tokenize(parts["tokenizer"], batch.captions))[0]
        pred = unet(noisy, batch.timesteps, hidden).sample
        target = {
            "epsilon": batch.noise,
            "v_prediction": scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps),
            "sample": batch.latents,
        }[prediction_type]
        expected = F.mse_loss(pred.float(), target.float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sdxl_objective_uses_both_encoders_pooled_embeddings_and_time_ids():
    parts = tiny_sdxl(seed=0)
    scheduler, unet = parts["noise_scheduler"], parts["unet"]
    te1, te2, tokenizer = parts["text_encoder"], parts["text_encoder_2"], parts["tokenizer"]
    batch = FixedEvalBatch(ToyConceptDataset(), vae=parts["vae"], noise_scheduler=scheduler).next()
    models = {"unet": unet, "text_encoder": te1, "text_encoder_2": te2}
    with torch.no_grad():
        loss = deterministic_loss(models, batch, scheduler, tokenizer, tokenizer)
        ids = tokenize(tokenizer, batch.captions)
        out1, out2 = te1(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * len(batch), dtype=torch.float32)
        noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = unet(noisy, batch.timesteps, hidden, added_cond_kwargs={"text_embeds": out2[0], "time_ids": time_ids}).sample
        expected = F.mse_loss(pred, batch.noise)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_flow_matching_objective_with_frozen_sigmas():
    parts = tiny_sd3(seed=0)
    scheduler, transformer = parts["noise_scheduler"], parts["transformer"]
    fixed = FixedEvalBatch(ToyConceptDataset(), vae=parts["vae"], noise_scheduler=scheduler)
    batch = fixed.next()
    assert batch.sigmas is not None and torch.all((batch.sigmas > 0) & (batch.sigmas <= 1))
    embeds = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(0))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))

    def encode_prompt(models, batch):  # SD3 users wrap pipe.encode_prompt here
        from dvar.objectives import PromptEmbeddings

        return PromptEmbeddings(embeds.expand(len(batch), -1, -1), pooled.expand(len(batch), -1))

    objective = DiffusionObjective(scheduler, prompt_encoder=encode_prompt)
    with torch.no_grad():
        loss = objective({"transformer": transformer}, batch)
        sigmas = batch.sigmas.view(-1, 1, 1, 1)
        noisy = (1 - sigmas) * batch.latents + sigmas * batch.noise
        pred = transformer(
            hidden_states=noisy,
            timestep=batch.timesteps,
            encoder_hidden_states=embeds.expand(len(batch), -1, -1),
            pooled_projections=pooled.expand(len(batch), -1),
        ).sample
        expected = F.mse_loss(pred, batch.noise - batch.latents)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # sigmas follow the scheduler's (shifted) table at the frozen timesteps
    table = dict(zip(scheduler.timesteps.tolist(), scheduler.sigmas.tolist()))
    assert batch.sigmas.tolist() == pytest.approx([table[t] for t in batch.timesteps.tolist()])


def test_text_embeddings_are_cached_only_while_the_text_side_is_frozen(sd_parts, toy_dataset):
    text_encoder = sd_parts["text_encoder"]
    models = {"unet": sd_parts["unet"], "text_encoder": text_encoder}
    batch = FixedEvalBatch(toy_dataset, vae=sd_parts["vae"], noise_scheduler=sd_parts["noise_scheduler"]).next()
    embedding = text_encoder.get_input_embeddings().weight
    original = embedding.detach().clone()
    try:
        for trainable, changes in [(False, False), (True, True)]:  # frozen: cached; TI-style: recomputed
            text_encoder.requires_grad_(False)
            embedding.requires_grad_(trainable)
            objective = DiffusionObjective(sd_parts["noise_scheduler"], tokenizer=sd_parts["tokenizer"])
            with torch.no_grad():
                before = objective(models, batch).item()
                # the token "a" moves, as a TI step would move its own token (not by a constant: CLIP's
                # layer norms cancel a shift shared by every feature)
                embedding[320].add_(torch.linspace(-1.0, 1.0, embedding.shape[1]))
                after = objective(models, batch).item()
                embedding.copy_(original)
            assert (before != after) is changes
    finally:
        text_encoder.requires_grad_(True)
        with torch.no_grad():
            embedding.copy_(original)


def test_dvar_restores_train_mode_and_computes_no_grad(sd_parts, toy_dataset):
    unet, text_encoder = sd_parts["unet"], sd_parts["text_encoder"]
    unet.train()
    text_encoder.eval()
    stopper = DVAREarlyStopping(
        unet=unet, vae=sd_parts["vae"], text_encoder=text_encoder, tokenizer=sd_parts["tokenizer"],
        noise_scheduler=sd_parts["noise_scheduler"], train_dataset=toy_dataset, window=2, threshold=0.5,
    )
    stopper.step(1)
    assert unet.training and not text_encoder.training
    assert all(p.grad is None for p in unet.parameters())


class ScaleWiseAR(torch.nn.Module):
    """A toy scale-wise autoregressive text-to-image model: predicts image tokens at scales
    1, 2, 4 (VAR-style), conditioned on caption tokens and on the coarser scales."""

    scales = (1, 2, 4)
    vocab = 16

    def __init__(self, dim=32):
        super().__init__()
        self.token = torch.nn.Embedding(self.vocab + 1, dim)  # +1: start token
        self.text = torch.nn.Embedding(49408, dim)
        self.pos = torch.nn.Parameter(torch.zeros(sum(s * s for s in self.scales), dim))
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.1, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, 2)
        self.head = torch.nn.Linear(dim, self.vocab)

    @classmethod
    def image_tokens(cls, pixel_values):
        gray = pixel_values.mean(1, keepdim=True)
        tokens = [
            ((F.adaptive_avg_pool2d(gray, s).flatten(1) + 1) / 2 * cls.vocab).long().clamp(0, cls.vocab - 1)
            for s in cls.scales
        ]
        return torch.cat(tokens, dim=1)

    def forward(self, tokens, caption_ids):
        inputs = torch.cat([torch.full_like(tokens[:, :1], self.vocab), tokens[:, :-1]], dim=1)
        h = self.token(inputs) + self.pos + self.text(caption_ids[:, :8]).mean(1, keepdim=True)
        n = h.shape[1]
        causal = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        return self.head(self.blocks(h, mask=causal))


def ar_loss(model, pixel_values, caption_ids):
    tokens = ScaleWiseAR.image_tokens(pixel_values)
    logits = model(tokens, caption_ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))


def test_custom_objective_scale_wise_autoregressive_cross_entropy(sd_parts):
    """No noise or timesteps to freeze: only images and captions, through a user function."""
    tokenizer = sd_parts["tokenizer"]
    torch.manual_seed(0)
    random.seed(0)
    model = ScaleWiseAR()
    dataset = ToyConceptDataset(num_images=6, resolution=16, seed=3)

    def objective(models, batch):
        return ar_loss(models["transformer"], batch.pixel_values, tokenize(tokenizer, batch.captions))

    stopper = DVAREarlyStopping(
        objective=objective, models={"transformer": model}, train_dataset=dataset, window=10, threshold=0.2
    )
    assert stopper.eval_batch.next().noise is None and stopper.eval_batch.next().timesteps is None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)
    step = 0
    while not stopper.should_stop and step < 300:
        for batch in loader:
            loss = ar_loss(model, batch["pixel_values"], tokenize(tokenizer, list(batch["prompt"])))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if stopper.step(step, loss):
                break
    assert stopper.should_stop and 10 <= stopper.stop_step < 300
    losses = [row.eval_loss for row in stopper.history]
    assert losses[-1] < losses[0]
    assert model.training  # dropout was only switched off while evaluating


def test_logit_normal_frozen_timesteps_follow_the_scripts_density(toy_dataset):
    """weighting_scheme='logit_normal' (the SD3 scripts' default) draws the frozen timesteps as the
    scripts do: sigma = 1 - sigmoid(N(0, 1)) puts 68% of them in [0.27, 0.73] (uniform: 46%)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)

    def logit_normal(k):
        return compute_density_for_timestep_sampling("logit_normal", batch_size=k, logit_mean=0.0, logit_std=1.0)

    def share_in_middle(density):
        sigmas = torch.cat([
            FixedEvalBatch(toy_dataset, noise_scheduler=scheduler, seed=seed, timestep_density=density).frozen.sigmas
            for seed in range(100)
        ])
        return float(((sigmas > 0.27) & (sigmas < 0.73)).float().mean())

    assert share_in_middle(logit_normal) == pytest.approx(0.68, abs=0.07)
    assert share_in_middle(None) == pytest.approx(0.46, abs=0.07)


@pytest.mark.parametrize(
    "scheduler, kwargs, message",
    [
        ("flow", {"weighting_scheme": "sigma"}, "Unknown weighting_scheme 'sigma'"),
        ("ddpm", {"weighting_scheme": "sigma_sqrt"}, "is a flow-matching .SD3/Flux. option"),
        ("flow", {"snr_gamma": 5.0}, "snr_gamma=5.0 needs a DDPM-family noise scheduler"),
        ("ddpm", {"snr_gamma": 0.0}, "and a value > 0"),
    ],
)
def test_impossible_loss_settings(scheduler, kwargs, message, toy_dataset):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    noise_scheduler = FlowMatchEulerDiscreteScheduler() if scheduler == "flow" else DDPMScheduler()
    with pytest.raises(ValueError, match=message):
        DiffusionObjective(noise_scheduler, **kwargs)


def test_timestep_density_needs_a_flow_matching_scheduler(toy_dataset):
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="for flow-matching"):
        FixedEvalBatch(toy_dataset, noise_scheduler=DDPMScheduler(), timestep_density=lambda k: torch.rand(k))


def test_vae_latents_mean_and_std_are_applied_as_the_sdxl_scripts_do(toy_dataset):
    """``(x - latents_mean) * scaling_factor / latents_std`` for a VAE whose config gives them."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16,), norm_num_groups=8, latent_channels=4, scaling_factor=0.5,
                        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 4.0])
    fixed = FixedEvalBatch(toy_dataset, vae=vae, noise_scheduler=None)
    pixels = fixed.frozen.pixel_values
    assert fixed.vae is None  # encoded once, then let go (nothing is resampled)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    m, s = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1), torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    assert torch.allclose(fixed._latent_mean, (dist.mean - m) * 0.5 / s, atol=1e-6)
    assert torch.allclose(fixed._latent_std, dist.std * 0.5 / s, atol=1e-6)


def test_a_repeated_caption_is_encoded_once_with_the_same_bits():
    """Custom Diffusion's and DreamBooth's frozen batch repeats the instance prompt: the text encoder runs once
    per distinct caption, and the embeddings (hence the loss) are bitwise those of encoding every row."""
    from dvar_lab.models import load_mini_sd_pipeline
    from dvar.objectives import encode_distinct_rows

    pipe = load_mini_sd_pipeline()
    captions = ["a photo of a <new1> star", "a photo of a star", "a photo of a <new1> star", "a photo of a <new1> star"]
    ids = tokenize(pipe.tokenizer, captions)
    calls = []

    def encode(rows):
        calls.append(rows.shape[0])
        return pipe.text_encoder(rows, return_dict=False)[0]

    with torch.no_grad():
        once = encode_distinct_rows(encode, ids)
        every_row = pipe.text_encoder(ids, return_dict=False)[0]
    assert calls == [2] and torch.equal(once, every_row)
