"""Custom Diffusion with DVAR early stopping.

Trains, as diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` does, new
key/value projections of every cross-attention layer (``--freeze_model crossattn_kv``; with
``crossattn`` also the query and output projections) through ``CustomDiffusionAttnProcessor``
layers initialised from the UNet's own weights, plus the embedding of one new modifier token.
Everything else stays frozen. ``--with_prior_preservation`` adds the same class-image loss as
DreamBooth (flags and class-image generation shared with integrations/dreambooth.py; with
``--scale_lr`` the learning rate is doubled then, as diffusers' script does). The random
rescale/mask augmentation of diffusers' dataset is not reproduced: images are resized and
cropped as for the other methods, so the loss needs no mask. Saves, loadable without dvar:

* ``pytorch_custom_diffusion_weights.safetensors`` (``unet.save_attn_procs``), and
* ``<new1>.safetensors``, the modifier token (``pipe.load_textual_inversion``).

Checkpoints (``--checkpointing_steps``) hold the same two files, not the whole UNet and text encoder.

    python integrations/custom_diffusion.py --early-stop                   # mini-SD, bundled concept
    python integrations/custom_diffusion.py --pretrained_model_name_or_path ./sd-v1-5 \\
        --instance_data_dir ./my_cat --modifier_token "<new1>" --initializer_token cat \\
        --train_batch_size 2 --scale_lr --early-stop                    # the paper's / diffusers' setting

Loading the result (see :func:`load_custom_diffusion` for why it is not just
``pipe.unet.load_attn_procs``)::

    pipe = StableDiffusionPipeline.from_pretrained("./sd-v1-5")
    load_custom_diffusion(pipe, "outputs/custom_diffusion")   # or its 20 lines, copied
    pipe("a photo of a <new1> cat on the beach")
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch


from .data import UsageError
from .concepts import concept_class_word
from .dreambooth import DreamBoothBase
from .tokens import (
    NewTokenRows,
    add_placeholder_tokens,
    check_initializer_token,
    check_new_tokens,
    save_token_embeddings,
)
from .method import Budget, Components
from .trainer import main as train_main

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
# A rare single token, as the paper initialises V*. diffusers' default is "ktn+pll+ucd", but "ktn"
# is two pieces (k, tn) in the SD 1.x CLIP vocabulary, which the single-token check refuses.
DEFAULT_INITIALIZER = "pll"


def processor_class() -> type:
    """The SDPA processor where PyTorch has it (it always does from 2.0), as diffusers' script picks."""
    import torch.nn.functional as F
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0

    return CustomDiffusionAttnProcessor2_0 if hasattr(F, "scaled_dot_product_attention") else CustomDiffusionAttnProcessor


def custom_diffusion_processors(unet: torch.nn.Module, train_q_out: bool) -> Dict[str, torch.nn.Module]:
    """One processor per attention layer of ``unet``, as diffusers' script builds them.

    Cross-attention layers get trainable ``to_k``/``to_v`` copies (and ``to_q``/``to_out``
    with ``train_q_out``) initialised from the layer's own weights; self-attention layers get
    parameter-free processors. Sizes come from each layer's ``to_k`` (in: the text width,
    out: the attention width), so any UNet shape works, not only SD's block layout.
    """
    cls = processor_class()
    processors: Dict[str, torch.nn.Module] = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name[: -len(".processor")])
        cross = getattr(attn, "is_cross_attention", not name.endswith("attn1.processor"))
        hidden_size, in_features = attn.to_k.out_features, attn.to_k.in_features
        if not cross:
            processors[name] = cls(train_kv=False, train_q_out=False, hidden_size=hidden_size, cross_attention_dim=None)
            continue
        weights = {
            "to_k_custom_diffusion.weight": attn.to_k.weight,
            "to_v_custom_diffusion.weight": attn.to_v.weight,
        }
        if train_q_out:
            weights["to_q_custom_diffusion.weight"] = attn.to_q.weight
            weights["to_out_custom_diffusion.0.weight"] = attn.to_out[0].weight
            if attn.to_out[0].bias is not None:
                weights["to_out_custom_diffusion.0.bias"] = attn.to_out[0].bias
        processor = cls(
            train_kv=True, train_q_out=train_q_out, hidden_size=hidden_size, cross_attention_dim=in_features,
            out_bias=attn.to_out[0].bias is not None,
        )
        processor.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
        processors[name] = processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
    return processors


def load_custom_diffusion(pipe: Any, output_dir: str, modifier_tokens: Sequence[str] = ("<new1>",)) -> None:
    """Load a Custom Diffusion result into a diffusers pipeline, with diffusers calls only.

    ``pipe.unet.load_attn_procs(output_dir, weight_name=...)`` is the documented call, but in
    diffusers up to at least 0.42 it builds the processors and never installs them (the
    ``set_attn_processor`` call sits under ``if _pipeline is not None``; huggingface/diffusers
    issue #9320), so it silently returns the base UNet; passing ``_pipeline=pipe`` then fails
    on safetensors files, which drop the empty self-attention entries. These lines do what it
    means to do and need nothing from dvar (copy them into your code).
    """
    from safetensors.torch import load_file

    state = load_file(os.path.join(output_dir, WEIGHT_NAME))
    cls = processor_class()
    processors = dict(pipe.unet.attn_processors)  # self-attention keeps its processor
    for name in processors:
        weights = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if weights:
            to_k = weights["to_k_custom_diffusion.weight"]
            processors[name] = cls(
                train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights, hidden_size=to_k.shape[0],
                cross_attention_dim=to_k.shape[1], out_bias="to_out_custom_diffusion.0.bias" in weights,
            )
            processors[name].load_state_dict(weights)
    pipe.unet.set_attn_processor(processors)
    pipe.unet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    for token in modifier_tokens:
        pipe.load_textual_inversion(output_dir, weight_name=f"{token}.safetensors")


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence one library logger (``save_attn_procs`` warns that it drops the empty self-attention entries)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class CustomDiffusion(DreamBoothBase):
    """Custom Diffusion; instance/class data and prior preservation come from :class:`DreamBoothBase`
    (integrations/dreambooth.py), whose flags and loss diffusers' script shares with train_dreambooth.py."""

    name = "custom_diffusion"
    preset = "custom_diffusion"
    sd_budget = Budget(max_train_steps=500, learning_rate=1e-5)  # the paper's (diffusers' README adds --scale_lr)
    mini_sd_budget = Budget(max_train_steps=600, learning_rate=1e-4)  # measured: docs/trainers.md
    can_train_text_encoder = False  # the modifier token's embedding trains, not the encoder
    instance_prompt_help = (
        "Prompt with the modifier token, e.g. 'a photo of a <new1> cat' (default: 'a photo of a "
        "<modifier_token> <class word>', the class word from a bundled concept's <name>.json)."
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)  # --instance_data_dir, --instance_prompt, prior preservation, ...
        parser.add_argument("--modifier_token", default="<new1>", help="The new token learned for the concept.")
        parser.add_argument(
            "--initializer_token", default=None,
            help=f"A single-token word the modifier token starts from (default: the bundled concept's class word, else '{DEFAULT_INITIALIZER}').",
        )
        parser.add_argument(
            "--freeze_model", choices=["crossattn_kv", "crossattn"], default="crossattn_kv",
            help="crossattn_kv: train the cross-attention key/value projections; crossattn: also query and output.",
        )

    def default_instance_prompt(self, args: argparse.Namespace, class_word: Optional[str]) -> Optional[str]:
        return f"a photo of a {args.modifier_token}" + (f" {class_word}" if class_word else "")

    def validate(self, args: argparse.Namespace, tokenizer: Any) -> None:
        if "+" in args.modifier_token:
            raise UsageError(
                f"--modifier_token {args.modifier_token!r}: one concept per run here (diffusers' '+'-separated "
                "multi-concept lists are not supported); pass a single new token such as '<new1>'."
            )
        if args.initializer_token is None:
            args.initializer_token = concept_class_word(args.instance_data_dir) or DEFAULT_INITIALIZER
        check_new_tokens(tokenizer, [args.modifier_token], "--modifier_token")
        check_initializer_token(tokenizer, args.initializer_token)
        super().validate(args, tokenizer)  # instance prompt default, prior-preservation checks
        if args.modifier_token not in args.instance_prompt:
            raise UsageError(
                f"--instance_prompt {args.instance_prompt!r} does not contain the modifier token "
                f"{args.modifier_token!r}: the token would never be trained. Put it in, e.g. "
                f"'a photo of a {args.modifier_token} cat'."
            )

    def setup(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> List[torch.nn.Parameter]:
        self.prepare_models(args, parts, accelerator)  # all frozen, checkpoint hooks
        if args.scale_lr and args.with_prior_preservation:
            args.learning_rate *= 2.0  # as train_custom_diffusion.py: the batch holds class examples too
        self.token_ids = add_placeholder_tokens(
            parts.tokenizer, parts.text_encoder, [args.modifier_token], args.initializer_token
        )
        self.modifier_token = args.modifier_token
        parts.unet.set_attn_processor(custom_diffusion_processors(parts.unet, train_q_out=args.freeze_model == "crossattn"))
        processor_params = [p for proc in parts.unet.attn_processors.values() for p in proc.parameters()]
        for param in processor_params:
            param.requires_grad_(True)
        self.token_rows = NewTokenRows(parts.text_encoder, self.token_ids)  # only the modifier token learns
        return [self.token_rows.weight] + processor_params

    def after_optimizer_step(self, parts: Components, accelerator: Any) -> None:
        self.token_rows.restore(accelerator.unwrap_model(parts.text_encoder))

    def save(self, output_dir: str, parts: Components, accelerator: Any) -> List[str]:
        unet = accelerator.unwrap_model(parts.unet)
        with quiet_logger("diffusers.loaders.unet"):
            unet.save_attn_procs(output_dir, safe_serialization=True)
        text_encoder = accelerator.unwrap_model(parts.text_encoder)
        token_file = save_token_embeddings(
            text_encoder, parts.tokenizer, self.token_ids, output_dir, f"{self.modifier_token}.safetensors"
        )
        return [WEIGHT_NAME, token_file]

    def save_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        # as diffusers' script: checkpoints hold only the processors and the token, not the whole UNet
        self.save(folder, parts, accelerator)

    def load_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        """Inverse of ``save`` into the models being trained (resuming from a checkpoint)."""
        from safetensors.torch import load_file

        unet = accelerator.unwrap_model(parts.unet)
        state = load_file(os.path.join(folder, WEIGHT_NAME))
        result = unet.load_state_dict(state, strict=False)
        expected = {name for name, _ in unet.named_parameters() if "custom_diffusion" in name}
        if result.unexpected_keys or set(state) != expected:
            raise RuntimeError(f"{folder}/{WEIGHT_NAME} does not match this run's processors (--freeze_model?).")
        (vector,) = load_file(os.path.join(folder, f"{self.modifier_token}.safetensors")).values()
        embedding = accelerator.unwrap_model(parts.text_encoder).get_input_embeddings()
        with torch.no_grad():
            embedding.weight[self.token_ids] = vector.to(embedding.weight)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(CustomDiffusion(), argv)


if __name__ == "__main__":
    sys.exit(main())
