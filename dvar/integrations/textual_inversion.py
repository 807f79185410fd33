"""Textual Inversion with DVAR early stopping.

Learns one or more new token embeddings for a concept; everything else stays frozen.
Saves ``learned_embeds.safetensors``, which ``pipe.load_textual_inversion(output_dir)``
loads without dvar installed.

    python integrations/textual_inversion.py --early-stop                  # mini-SD, bundled concept
    python integrations/textual_inversion.py --pretrained_model_name_or_path ./sd-v1-5 \\
        --train_data_dir ./my_cat --placeholder_token "<my-cat>" --initializer_token cat --early-stop
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional, Sequence

import torch
from safetensors.torch import load_file

from .concepts import bundled_concept, concept_class_word, concept_prompts
from .data import OBJECT_TEMPLATES, STYLE_TEMPLATES, ConceptDataset, UsageError
from .tokens import (
    NewTokenRows,
    add_placeholder_tokens,
    check_initializer_token,
    check_new_tokens,
    save_token_embeddings,
)
from .method import Budget, Components, Method
from .trainer import main as train_main

WEIGHTS = "learned_embeds.safetensors"  # what pipe.load_textual_inversion(output_dir) reads


class TextualInversion(Method):
    name = "textual_inversion"
    preset = "textual_inversion"
    sd_budget = Budget(max_train_steps=6100, learning_rate=5e-3)
    mini_sd_budget = Budget(max_train_steps=1000, learning_rate=1e-3)  # measured: docs/trainers.md
    data_flag = "--train_data_dir"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--train_data_dir", default=None, help="Folder of concept photos (default: a bundled concept).")
        parser.add_argument("--placeholder_token", default="<concept>", help="The new token, e.g. <my-cat>.")
        parser.add_argument("--initializer_token", default=None, help="A single-token word to start from (default: the bundled concept's class word, else 'object').")
        parser.add_argument("--learnable_property", choices=["object", "style"], default="object")
        parser.add_argument("--num_vectors", type=int, default=1, help="Embedding vectors for the placeholder.")

    def data_dir(self, args: argparse.Namespace) -> Optional[str]:
        if args.train_data_dir is None:
            args.train_data_dir = str(bundled_concept(self.name).path)
        return args.train_data_dir

    def placeholder_tokens(self, args: argparse.Namespace) -> List[str]:
        return [args.placeholder_token] + [f"{args.placeholder_token}_{i}" for i in range(1, args.num_vectors)]

    def validate(self, args: argparse.Namespace, tokenizer: Any) -> None:
        if args.num_vectors < 1:
            raise UsageError(f"--num_vectors must be >= 1 (got {args.num_vectors}).")
        if args.initializer_token is None:
            args.initializer_token = concept_class_word(args.train_data_dir) or "object"
        check_new_tokens(tokenizer, self.placeholder_tokens(args), "--placeholder_token")
        check_initializer_token(tokenizer, args.initializer_token)

    def templates(self, args: argparse.Namespace) -> Sequence[str]:
        if args.learnable_property == "style":
            return STYLE_TEMPLATES
        return concept_prompts(args.train_data_dir) or OBJECT_TEMPLATES

    def build_datasets(self, args: argparse.Namespace, images: Sequence[Any], accelerator: Any) -> tuple:
        word = " ".join(self.placeholder_tokens(args))
        dataset = ConceptDataset(
            images, [t.format(word) for t in self.templates(args)], args.resolution, args.random_flip, args.center_crop
        )
        return dataset, dataset  # DVAR: the first K examples are K different photos, first template

    def setup(self, args: argparse.Namespace, parts: Components, accelerator: Any) -> List[torch.nn.Parameter]:
        self.token_ids = add_placeholder_tokens(
            parts.tokenizer, parts.text_encoder, self.placeholder_tokens(args), args.initializer_token
        )
        parts.unet.requires_grad_(False)
        parts.text_encoder.requires_grad_(False)
        self.token_rows = NewTokenRows(parts.text_encoder, self.token_ids)
        self.register_checkpoint_hooks(parts, accelerator)  # checkpoints hold the embedding, not the text encoder
        return [self.token_rows.weight]

    def after_optimizer_step(self, parts: Components, accelerator: Any) -> None:
        self.token_rows.restore(accelerator.unwrap_model(parts.text_encoder))

    def save(self, output_dir: str, parts: Components, accelerator: Any) -> List[str]:
        text_encoder = accelerator.unwrap_model(parts.text_encoder)
        return [save_token_embeddings(text_encoder, parts.tokenizer, self.token_ids, output_dir, WEIGHTS)]

    def save_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> None:
        self.save(folder, parts, accelerator)  # the other rows are the base model's, restored after every step

    def load_checkpoint_weights(self, folder: str, parts: Components, accelerator: Any) -> bool:
        path = os.path.join(folder, WEIGHTS)
        if not os.path.isfile(path):  # a checkpoint of an older dvar: accelerate's whole text encoder
            return False
        (vectors,) = load_file(path).values()
        embedding = accelerator.unwrap_model(parts.text_encoder).get_input_embeddings()
        with torch.no_grad():
            embedding.weight[self.token_ids] = vectors.to(embedding.weight)
        return True

    def default_validation_prompt(self, args: argparse.Namespace) -> str:
        template = "a painting in the style of {}" if args.learnable_property == "style" else "a photo of a {}"
        return template.format(args.placeholder_token)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train_main(TextualInversion(), argv)


if __name__ == "__main__":
    sys.exit(main())
