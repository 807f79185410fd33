"""The frozen evaluation batch: the inputs of the DVAR loss, drawn once and then reused.

DVAR's signal comes from evaluating the training objective on inputs whose random
parts never change, so that the loss moves only because the trained parameters move.
:class:`FixedEvalBatch` draws those parts once from private generators; any of them
can instead be redrawn at every evaluation, for the paper's ablation.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

PARTS: Tuple[str, ...] = ("images", "latents", "noise", "captions", "timesteps")

IMAGE_KEYS = ("pixel_values", "instance_images", "images", "image")
CAPTION_KEYS = ("prompt", "prompts", "caption", "captions", "text", "instance_prompt")
TOKEN_KEYS = ("input_ids", "instance_prompt_ids", "prompt_ids")
#: SDXL micro-conditioning of a dataset item (diffusers' train_dreambooth_lora_sdxl.py).
SIZE_KEYS = ("original_size", "crop_top_left")


@contextlib.contextmanager
def isolated_global_rng(seed: Optional[int] = None) -> Iterator[None]:
    """Run code that uses Python's, NumPy's or torch's global RNGs without disturbing them.

    Dataset ``__getitem__`` methods (random flips, random prompt templates) draw from the
    global generators; reading evaluation examples inside this context leaves the training
    run's random streams exactly where they were. With ``seed`` the code inside sees
    freshly seeded generators, so what it draws is itself reproducible.

    >>> state = random.getstate()
    >>> with isolated_global_rng(seed=1):
    ...     _ = random.random()
    >>> random.getstate() == state
    True
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda_devices):
        try:
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.manual_seed(seed)
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _dataset_of(data: Any) -> Any:
    """Examples in dataset order: a DataLoader's dataset, or the sequence itself."""
    if isinstance(data, torch.utils.data.DataLoader):
        return data.dataset
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(
            f"Expected a map-style dataset, a DataLoader over one, or a list of examples; got {type(data).__name__}. "
            "Pass FixedEvalBatch.from_tensors(pixel_values, captions) for other data sources."
        )
    return data


def _example_parts(example: Any) -> Tuple[torch.Tensor, Union[str, torch.Tensor, None]]:
    """(image tensor [C, H, W], caption string or token ids) from one dataset item."""
    if isinstance(example, Mapping):
        image = next((example[key] for key in IMAGE_KEYS if key in example), None)
        if image is None:
            raise KeyError(
                f"Cannot find the image in a dataset item with keys {sorted(example)}; "
                f"expected one of {IMAGE_KEYS}."
            )
        caption = next((example[key] for key in CAPTION_KEYS if key in example), None)
        if caption is None:
            caption = next((example[key] for key in TOKEN_KEYS if key in example), None)
    elif isinstance(example, (tuple, list)) and len(example) >= 1:
        image, caption = example[0], (example[1] if len(example) > 1 else None)
    else:
        raise TypeError(f"Dataset items must be dicts or (image, caption) tuples; got {type(example).__name__}.")
    image = torch.as_tensor(image)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"Expected an image tensor shaped [C, H, W]; got shape {tuple(image.shape)}.")
    if isinstance(caption, torch.Tensor) and caption.ndim == 2 and caption.shape[0] == 1:
        caption = caption[0]
    return image, caption


def _size_conditioning(example: Any) -> Optional[Tuple[int, int, int, int]]:
    """(original height, width, crop top, left) when the item gives them (SDXL datasets), else None."""
    if isinstance(example, Mapping) and all(key in example for key in SIZE_KEYS):
        (height, width), (top, left) = example["original_size"], example["crop_top_left"]
        return int(height), int(width), int(top), int(left)
    return None


def is_flow_matching(noise_scheduler: Any) -> bool:
    """True for rectified-flow schedulers (SD3 / Flux style ``FlowMatch*``)."""
    return noise_scheduler is not None and type(noise_scheduler).__name__.startswith("FlowMatch")


@dataclass
class EvalBatch:
    """The inputs of one DVAR evaluation (the frozen parts, plus any redrawn ones).

    Attributes:
        pixel_values: images in the training range (usually [-1, 1]), ``[k, C, H, W]``.
        captions: prompt strings, or None when the dataset gives token ids.
        input_ids: token ids ``[k, L]`` when the dataset gives them, else None.
        prompt_embeds: precomputed text-encoder states ``[k, L, D]`` when the dataset gives them.
        latents: scaled VAE latents (pixel values for pixel-space models), or None.
        noise: diffusion noise shaped like ``latents``, or None.
        timesteps: one timestep per example (distinct), or None.
        sigmas: flow-matching noise levels matching ``timesteps``, or None.
        size_conditioning: SDXL ``(original height, width, crop top, left)`` per example
            ``[k, 4]`` when the dataset gives them, else None.
        indices: dataset indices of the examples.
        generator: a private CPU generator for custom objectives that need more randomness.
        cache_key: equal for evaluations whose inputs are identical (None when redrawn).
    """

    pixel_values: torch.Tensor
    captions: Optional[List[str]] = None
    input_ids: Optional[torch.Tensor] = None
    prompt_embeds: Optional[torch.Tensor] = None
    latents: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    timesteps: Optional[torch.Tensor] = None
    sigmas: Optional[torch.Tensor] = None
    size_conditioning: Optional[torch.Tensor] = None
    indices: List[int] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    text_cache_key: Optional[Tuple[Any, ...]] = None
    input_cache_key: Optional[Tuple[Any, ...]] = None

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def select(self, positions: Sequence[int]) -> "EvalBatch":
        """The sub-batch at ``positions`` (used to split the batch across processes)."""
        positions = list(positions)
        index = torch.tensor(positions, dtype=torch.long)

        def take(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.index_select(0, index.to(t.device))

        key = tuple(positions)
        return replace(
            self,
            pixel_values=take(self.pixel_values),
            captions=None if self.captions is None else [self.captions[i] for i in positions],
            input_ids=take(self.input_ids),
            prompt_embeds=take(self.prompt_embeds),
            latents=take(self.latents),
            noise=take(self.noise),
            timesteps=take(self.timesteps),
            sigmas=take(self.sigmas),
            size_conditioning=take(self.size_conditioning),
            indices=[self.indices[i] for i in positions],
            text_cache_key=None if self.text_cache_key is None else self.text_cache_key + key,
            input_cache_key=None if self.input_cache_key is None else self.input_cache_key + key,
        )

    def shard(self, rank: int, world_size: int) -> "EvalBatch":
        """Contiguous share of process ``rank``; shares differ in size by at most one."""
        return self.select(range(self.shard_start(rank, world_size), self.shard_start(rank + 1, world_size)))

    def shard_start(self, rank: int, world_size: int) -> int:
        """The position of process ``rank``'s first example (``rank == world_size``: the batch's end).

        >>> [EvalBatch(torch.zeros(5, 3, 8, 8)).shard_start(r, 2) for r in range(3)]
        [0, 2, 5]
        """
        return int(np.linspace(0, len(self), world_size + 1).round().astype(int)[rank])


class FixedEvalBatch:
    """The DVAR evaluation batch: images, latents, noise, captions and timesteps drawn once.

    Args:
        train_data: the training dataset (or a DataLoader over it); the first
            ``batch_size`` examples in dataset order are used.
        vae: encodes the images once; its latent distribution is sampled with a private
            generator and multiplied by ``vae.config.scaling_factor``. None for pixel-space
            models or objectives that need no latents.
        noise_scheduler: gives the timestep range, and (``FlowMatch*``) the sigmas.
        batch_size: K, the number of frozen examples (the paper uses 4).
        seed: seed of the private generators; the same seed gives the same batch.
        resample: parts in ``PARTS`` to redraw at every evaluation instead (ablation).
        timestep_density: flow matching: ``k -> u`` in [0, 1), the script's timestep density
            (e.g. diffusers' ``compute_density_for_timestep_sampling`` with
            ``weighting_scheme="logit_normal"``), called with the global RNGs privately seeded;
            timestep ``i`` is ``scheduler.timesteps[int(u_i * num_train_timesteps)]``, as in the
            SD3/Flux scripts. Default: distinct timesteps drawn uniformly.

    Nothing here touches the global random generators, so attaching it does not change
    the training run's own random streams.

    Example:
        >>> batch = FixedEvalBatch(train_dataset, vae=vae, noise_scheduler=scheduler)  # doctest: +SKIP
        >>> inputs = batch.next()  # the same inputs every call  # doctest: +SKIP
    """

    def __init__(
        self,
        train_data: Any,
        vae: Optional[torch.nn.Module] = None,
        noise_scheduler: Any = None,
        batch_size: int = 4,
        seed: int = 0,
        resample: Iterable[str] = (),
        timestep_density: Optional[Callable[[int], torch.Tensor]] = None,
    ) -> None:
        self.resample = frozenset(resample)
        unknown = self.resample - set(PARTS)
        if unknown:
            raise ValueError(f"Unknown part(s) to resample: {sorted(unknown)}; choose from {PARTS}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size}).")
        self.dataset = _dataset_of(train_data)
        if len(self.dataset) == 0:
            raise ValueError("The training dataset is empty: DVAR needs at least one example to freeze.")
        self.vae = vae
        self.noise_scheduler = noise_scheduler
        self.flow_matching = is_flow_matching(noise_scheduler)
        if timestep_density is not None and not self.flow_matching:
            raise ValueError("timestep_density is for flow-matching (FlowMatch*) schedulers, as in the SD3/Flux scripts.")
        self.timestep_density = timestep_density
        self.has_latents = vae is not None or noise_scheduler is not None
        if batch_size > len(self.dataset):
            warnings.warn(f"The frozen DVAR batch asks for {batch_size} examples but the training set holds "
                          f"{len(self.dataset)}: it freezes all {len(self.dataset)} (the summary records the size used).",
                          stacklevel=3)
        self.batch_size = min(batch_size, len(self.dataset))
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.num_draws = 0
        self.frozen = self._draw(list(range(self.batch_size)))
        if "images" not in self.resample:
            self.vae = None  # encoded once: let a script that frees its VAE (--cache_latents) free it

    @classmethod
    def from_tensors(
        cls,
        pixel_values: torch.Tensor,
        captions: Union[Sequence[str], torch.Tensor, None] = None,
        **kwargs: Any,
    ) -> "FixedEvalBatch":
        """Build from ready tensors: ``pixel_values`` ``[N, C, H, W]`` and N captions (or token ids)."""
        examples = [
            (pixel_values[i], None if captions is None else captions[i]) for i in range(pixel_values.shape[0])
        ]
        return cls(examples, **kwargs)

    # -- drawing -------------------------------------------------------------------------

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self.generator))

    def _read_examples(self, indices: Sequence[int]) -> Tuple[torch.Tensor, List[Any], Optional[torch.Tensor]]:
        with isolated_global_rng(seed=self._next_seed()):
            examples = [self.dataset[i] for i in indices]
            parts = [_example_parts(example) for example in examples]
        pixel_values = torch.stack([image.float() for image, _ in parts])
        sizes = [_size_conditioning(example) for example in examples]
        size_conditioning = None if None in sizes else torch.tensor(sizes, dtype=torch.long)
        return pixel_values, [caption for _, caption in parts], size_conditioning

    @torch.no_grad()
    def _encode(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the scaled latent distribution (computed once per image set)."""
        if self.vae is None:
            return pixel_values, torch.zeros_like(pixel_values)
        param = next(self.vae.parameters())
        encoded = self.vae.encode(pixel_values.to(param.device, param.dtype))
        dist = getattr(encoded, "latent_dist", None)
        if dist is not None:
            mean, std = dist.mean.float(), dist.std.float()
        else:  # deterministic encoders (e.g. AutoencoderTiny)
            mean = encoded.latents.float()
            std = torch.zeros_like(mean)
        config = self.vae.config
        scale = getattr(config, "scaling_factor", 1.0)
        latents_mean, latents_std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if latents_mean is not None and latents_std is not None:  # SDXL scripts: (x - mean) * scale / std
            view = (1, -1, 1, 1)
            latents_mean = torch.tensor(latents_mean, dtype=mean.dtype, device=mean.device).view(view)
            latents_std = torch.tensor(latents_std, dtype=mean.dtype, device=mean.device).view(view)
            return ((mean - latents_mean) * scale / latents_std).cpu(), (std * scale / latents_std).cpu()
        shift = getattr(config, "shift_factor", None) or 0.0
        return ((mean - shift) * scale).cpu(), (std * scale).cpu()

    def _draw_timesteps(self, k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        scheduler = self.noise_scheduler
        num_train_timesteps = scheduler.config.num_train_timesteps
        if self.timestep_density is not None:
            with isolated_global_rng(seed=self._next_seed()):
                u = self.timestep_density(k).cpu()
            positions = (u * num_train_timesteps).long()  # the SD3/Flux scripts' indices
        else:
            positions = torch.randperm(num_train_timesteps, generator=self.generator)[:k]
            if k > num_train_timesteps:
                raise ValueError(f"Cannot draw {k} distinct timesteps from {num_train_timesteps}.")
        if not self.flow_matching:
            return positions, None
        # A fresh scheduler: the user's may have been set up for inference (set_timesteps).
        fresh = type(scheduler).from_config(scheduler.config)
        return fresh.timesteps[positions].float(), fresh.sigmas[positions].float()

    def _draw(
        self, indices: List[int], base: Optional[EvalBatch] = None, caption_indices: Optional[List[int]] = None
    ) -> EvalBatch:
        """Draw the parts that are frozen (``base is None``) or resampled (``base`` given)."""
        redraw = (lambda part: True) if base is None else (lambda part: part in self.resample)
        if base is None or "images" in self.resample or "captions" in self.resample:
            pixel_values, captions, size_conditioning = self._read_examples(indices)
            if caption_indices is not None:
                _, captions, _ = self._read_examples(caption_indices)
        if base is not None and "images" not in self.resample:
            pixel_values, indices, size_conditioning = base.pixel_values, base.indices, base.size_conditioning
        if base is not None and "captions" not in self.resample:
            texts, input_ids, prompt_embeds = base.captions, base.input_ids, base.prompt_embeds
        else:
            texts, input_ids, prompt_embeds = _split_captions(captions)

        if base is None or "images" in self.resample:
            latent_mean, latent_std = self._encode(pixel_values)
        else:
            latent_mean, latent_std = self._latent_mean, self._latent_std
        k = pixel_values.shape[0]
        latents = noise = timesteps = sigmas = None
        if self.has_latents:
            if redraw("latents") or "images" in self.resample:
                eps = torch.randn(latent_mean.shape, generator=self.generator)
                latents = latent_mean + latent_std * eps
            else:
                latents = base.latents
        if self.noise_scheduler is not None:
            noise = torch.randn(latents.shape, generator=self.generator) if redraw("noise") else base.noise
            if redraw("timesteps"):
                timesteps, sigmas = self._draw_timesteps(k)
            else:
                timesteps, sigmas = base.timesteps, base.sigmas
        if base is None:
            self._latent_mean, self._latent_std = latent_mean, latent_std

        text_frozen = not ({"images", "captions"} & self.resample)
        inputs_frozen = not self.resample
        return EvalBatch(
            pixel_values=pixel_values,
            captions=texts,
            input_ids=input_ids,
            prompt_embeds=prompt_embeds,
            latents=latents,
            noise=noise,
            timesteps=timesteps,
            sigmas=sigmas,
            size_conditioning=size_conditioning,
            indices=list(indices),
            generator=self.generator,
            text_cache_key=("text",) if text_frozen else None,
            input_cache_key=("inputs",) if inputs_frozen else None,
        )

    def __len__(self) -> int:
        """The number of frozen examples (at most the training set's size)."""
        return self.batch_size

    def next(self) -> EvalBatch:
        """The inputs of the next evaluation: the frozen batch, with resampled parts redrawn."""
        self.num_draws += 1
        if not self.resample:
            return self.frozen
        indices = list(range(self.batch_size))
        caption_indices = None
        if "images" in self.resample:
            indices = torch.randperm(len(self.dataset), generator=self.generator)[: self.batch_size].tolist()
        elif "captions" in self.resample:
            # captions of random examples: datasets that pair each index with a fixed prompt
            # (one photo x several templates) change captions too, not only random-template ones
            caption_indices = torch.randint(len(self.dataset), (self.batch_size,), generator=self.generator).tolist()
        return self._draw(indices, base=self.frozen, caption_indices=caption_indices)

    # -- checkpointing -------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "num_draws": self.num_draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"Checkpoint used seed {state['seed']} for the evaluation batch, this run {self.seed}.")
        self.num_draws = state["num_draws"]
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        frozen = [p for p in PARTS if p not in self.resample]
        return f"FixedEvalBatch(k={self.batch_size}, seed={self.seed}, frozen={frozen}, resampled={sorted(self.resample)})"


def _split_captions(captions: List[Any]) -> Tuple[Optional[List[str]], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(strings, token ids, precomputed prompt embeddings): whichever the dataset gives."""
    if all(isinstance(c, str) for c in captions):
        return list(captions), None, None
    if all(isinstance(c, torch.Tensor) and not c.is_floating_point() for c in captions):
        return None, torch.stack([c.long() for c in captions]), None
    if all(isinstance(c, torch.Tensor) and c.is_floating_point() for c in captions):
        # e.g. train_dreambooth.py --pre_compute_text_embeddings: [1, L, D] per item
        return None, None, torch.stack([c[0] if c.ndim == 3 else c for c in captions]).float()
    if all(c is None for c in captions):
        return None, None, None
    raise TypeError("Captions must all be strings, all token-id tensors or all prompt-embedding tensors.")
