"""DreamBooth-LoRA with DVAR early stopping.

DreamBooth (same instance/class data and prior preservation: integrations/dreambooth.py)
training low-rank adapters on the UNet attention instead of the whole UNet, as diffusers'
examples/dreambooth/train_dreambooth_lora.py does; ``--train_text_encoder`` adds adapters to
the text encoder. As in the DVAR paper, the subject can get a new token
(``--placeholder_token``/``--initializer_token``) whose embedding trains with the adapters.

Saves ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(output_dir)``) and,
with a new token, ``learned_embeds.safetensors`` (``pipe.load_textual_inversion(output_dir)``);
neither needs dvar installed. Checkpoints hold the same two small files, not the whole UNet.
A FluxPipeline folder gets a LoRA on its transformer, as train_dreambooth_lora_flux.py (dvar/integrations/flux.py).

    python integrations/dreambooth_lora.py --early-stop                  # mini-SD, bundled concept
    python integrations/dreambooth_lora.py --pretrained_model_name_or_path ./sd-v1-5 \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of sks dog" --early-stop
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence

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
from .flux import TRANSFORMER_TARGETS, add_flux_arguments, flux_loss
from .method import Budget, Components
from .trainer import main as train_main

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TOKEN_WEIGHTS = "learned_embeds.safetensors"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_dreambooth_lora.py's UNet attention projections
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # and its CLIP attention projections


class DreamBoothLoRA(DreamBoothBase):
    name = "dreambooth_lora"
    preset = "dreambooth_lora"
    sd_budget = Budget(max_train_steps=1000, learning_rate=5e-4)  # the DVAR paper's DreamBooth-LoRA baseline
    mini_sd_budget = Budget(max_train_steps=1000, learning_rate=1e-3)  # measured: docs/trainers.md
    flux_budget = Budget(max_train_steps=1000, learning_rate=1e-4)  # train_dreambooth_lora_flux.py's rate
    mini_flow_budget = Budget(max_train_steps=1000, learning_rate=2e-3)  # measured: benchmarks/results/full-flow
    families = ("sd", "flux")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--rank", type=int, default=4, help="LoRA rank (lora_alpha = rank, as diffusers).")
        parser.add_argument("--placeholder_token", default=None,
                            help="Also learn a new token for the subject, e.g. '<my-dog>' (default: none; the "
                                 "instance prompt default becomes 'a photo of <token>').")
        parser.add_argument("--initializer_token", default=None,
                            help="Single-token word the new token starts from (default: the bundled concept's "
                                 "class word, else 'object').")
        add_flux_arguments(parser)

    def default_instance_prompt(self, args: argparse.Namespace, class_word: Optional[str]) -> Optional[str]:
        if args.placeholder_token:
            return f"a photo of {args.placeholder_token}"
        return super().default_instance_prompt(args, class_word)

    def validate(self, args: argparse.Namespace, tokenizer: Any) -> None:
        if args.rank < 1:
            raise UsageError(f"--rank must be >= 1 (got {args.rank}).")
        flux = getattr(args, "model_family", "sd") == "flux"
        for flag in ("placeholder_token", "initializer_token"):
            if flux and getattr(args, flag) is not None:
                raise UsageError(
                    f"--{flag} is not supported with a Flux model (FluxPipeline): a new token would need both its "
                    "CLIP and T5 tokenizers, which train_dreambooth_lora_flux.py does not train either. Leave it out "
                    "and put an identifier such as 'sks' in --instance_prompt."
                )
        if not flux and args.weighting_scheme != "none":
            raise UsageError(
                f"--weighting_scheme {args.weighting_scheme} is for Flux (flow-matching) models; this model is "
                "Stable Diffusion: leave it out."
            )
        if args.placeholder_token is None:
            if args.initializer_token is not None:
                raise UsageError("--initializer_token needs --placeholder_token, the new token it initialises.")
        else:
            if args.initializer_token is None:
                args.initializer_token = concept_class_word(args.instance_data_dir) or "object"
            check_new_tokens(tokenizer, [args.placeholder_token], "--placeholder_token")
            check_initializer_token(tokenizer, args.initializer_token)
        super().validate(args, tokenizer)
        if args.placeholder_token and args.placeholder_token not in args.instance_prompt:
            raise UsageError(
                f"--instance_prompt {args.instance_prompt!r} does not contain --placeholder_token "
                f"{args.placeholder_token!r}, so the new token could not learn; put it in the prompt."
            )

    def setup(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> List[torch.nn.Parameter]:
        from peft import LoraConfig

        self.prepare_models(args, parts, accelerator)
        self.token_ids: List[int] = []
        if args.placeholder_token:
            self.token_ids = add_placeholder_tokens(
                parts.tokenizer, parts.text_encoder, [args.placeholder_token], args.initializer_token
            )
        targets = TRANSFORMER_TARGETS if parts.family == "flux" else UNET_TARGETS
        parts.unet.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets)
        )
        trainable = [p for p in parts.unet.parameters() if p.requires_grad]
        if args.train_text_encoder:
            add_text_encoder_adapter(
                parts.text_encoder,
                LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                           target_modules=TEXT_ENCODER_TARGETS),
            )
            trainable += [p for p in parts.text_encoder.parameters() if p.requires_grad]
        self.token_rows = None
        self.prompt_cache: dict = {}  # Flux: the frozen encoders' output per batch of prompts
        if self.token_ids:  # as Textual Inversion: the whole table gets gradients, other rows are restored
            self.token_rows = NewTokenRows(parts.text_encoder, self.token_ids)
            trainable.append(self.token_rows.weight)
        return trainable

    def loss(self, batch: Any, parts: Components, weight_dtype: torch.dtype, args: argparse.Namespace) -> torch.Tensor:
        if parts.family != "flux":
            return super().loss(batch, parts, weight_dtype, args)
        weight = args.prior_loss_weight if args.with_prior_preservation else None
        return flux_loss(batch, parts, weight_dtype, args, prior_loss_weight=weight, cache=self.prompt_cache)

    def after_optimizer_step(self, parts: Components, accelerator: Any) -> None:
        if self.token_rows is not None:
            self.token_rows.restore(accelerator.unwrap_model(parts.text_encoder))

    def save(self, output_dir: str, parts: Components, accelerator: Any) -> List[str]:
        """As train_dreambooth_lora.py: peft state dicts in diffusers' key format; plus the new token."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet = accelerator.unwrap_model(parts.unet)
        text_encoder = accelerator.unwrap_model(parts.text_encoder)
        if parts.family == "flux":
            return self.save_flux(output_dir, unet, text_encoder)
        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        text_layers = None
        if self.args.train_text_encoder:
            text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True
        )
        files = [LORA_WEIGHTS]
        if self.token_ids:
            files.append(save_token_embeddings(text_encoder, parts.tokenizer, self.token_ids, output_dir, TOKEN_WEIGHTS))
        return files

    def save_flux(self, output_dir: str, transformer: torch.nn.Module, text_encoder: torch.nn.Module) -> List[str]:
        """As train_dreambooth_lora_flux.py: the peft state dicts, with their adapter metadata where diffusers
        stores it (>= 0.35)."""
        from diffusers import FluxPipeline
        from peft.utils import get_peft_model_state_dict

        trained = {"transformer": transformer, "text_encoder": text_encoder if self.args.train_text_encoder else None}
        try:
            from diffusers.training_utils import _collate_lora_metadata

            metadata = _collate_lora_metadata(trained)
        except ImportError:
            metadata = {}
        FluxPipeline.save_lora_weights(
            output_dir,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            text_encoder_lora_layers=get_peft_model_state_dict(text_encoder) if trained["text_encoder"] else None,
            safe_serialization=True,
            **metadata,
        )
        return [LORA_WEIGHTS]

    def save_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        self.save(folder, parts, accelerator)  # as train_dreambooth_lora.py: the adapters, not the whole UNet

    def load_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(os.path.join(folder, LORA_WEIGHTS))
        flux = parts.family == "flux"
        text_to_peft = convert_state_dict_to_peft
        if flux:  # saved in peft's own format: read as the script's _set_state_dict_into_text_encoder does
            def text_to_peft(layers: dict) -> dict:
                return convert_state_dict_to_peft(convert_state_dict_to_diffusers(layers))
        denoiser = "transformer." if flux else "unet."
        targets = [(denoiser, accelerator.unwrap_model(parts.unet), convert_unet_state_dict_to_peft)]
        if self.args.train_text_encoder:
            targets.append(("text_encoder.", accelerator.unwrap_model(parts.text_encoder), text_to_peft))
        for prefix, model, convert in targets:
            part = convert({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            result = set_peft_model_state_dict(model, part, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"{folder}/{LORA_WEIGHTS} does not match the adapters: {unexpected[:3]}...")
        if self.token_ids:
            (vectors,) = load_file(os.path.join(folder, TOKEN_WEIGHTS)).values()
            embedding = accelerator.unwrap_model(parts.text_encoder).get_input_embeddings()
            with torch.no_grad():
                embedding.weight[self.token_ids] = vectors.to(embedding.weight)


def add_text_encoder_adapter(text_encoder: torch.nn.Module, config: Any) -> None:
    """``text_encoder.add_adapter(config)`` (what diffusers' script calls) done with peft itself:
    transformers >= 5 refuses ``add_adapter`` with peft < 0.22, while the injection it wraps, and
    diffusers' ``load_lora_weights`` of the saved file, work with any peft the project accepts."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    if "default" not in (getattr(text_encoder, "peft_config", None) or {}):  # read by get_peft_model_state_dict
        text_encoder.peft_config = {"default": config}


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(DreamBoothLoRA(), argv)


if __name__ == "__main__":
    sys.exit(main())
