"""New tokens in the CLIP tokenizer: checks, initialisation, and diffusers-loadable files."""

from __future__ import annotations

import os
from typing import Any, List, Sequence

import torch
from safetensors.torch import save_file

from .data import UsageError


def token_ids(tokenizer: Any, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def check_new_tokens(tokenizer: Any, tokens: Sequence[str], flag: str) -> None:
    """Refuse tokens the tokenizer already has: training them would change an existing word."""
    for token in tokens:
        ids = token_ids(tokenizer, token)
        if token in tokenizer.get_added_vocab() or len(ids) == 1:
            raise UsageError(
                f"{flag} {token!r} is already in the tokenizer's vocabulary (id {ids[0]}): training it would "
                "change that word everywhere. Choose a new token, e.g. '<my-concept>'."
            )


def check_initializer_token(tokenizer: Any, word: str) -> None:
    ids = token_ids(tokenizer, word)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise UsageError(
            f"--initializer_token {word!r} is {len(ids)} tokens ({' '.join(pieces)}), it must be one: "
            "pass a single common word that describes the concept, e.g. 'dog', 'toy' or 'object'."
        )


def add_placeholder_tokens(tokenizer: Any, text_encoder: torch.nn.Module, tokens: Sequence[str], initializer: str) -> List[int]:
    """Add ``tokens`` to the tokenizer and the text encoder, initialised as ``initializer``."""
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise UsageError(f"Could not add the tokens {list(tokens)}: some already exist. Choose new ones.")
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[token_ids(tokenizer, initializer)[0]].clone()
    return ids


def save_token_embeddings(text_encoder: torch.nn.Module, tokenizer: Any, ids: Sequence[int], output_dir: str, filename: str) -> str:
    """``{first_token: [n_vectors, dim]}`` as diffusers' textual_inversion.py writes it."""
    weight = text_encoder.get_input_embeddings().weight
    token = tokenizer.convert_ids_to_tokens(ids[0])
    save_file({token: weight[list(ids)].detach().float().cpu().contiguous()}, os.path.join(output_dir, filename))
    return filename


class NewTokenRows:
    """Train only the new tokens' rows of the embedding table.

    The optimizer sees the whole table (as in diffusers' textual_inversion.py); after every
    step :meth:`restore` puts every other row back, undoing weight decay and updates.

    Example:
        >>> rows = NewTokenRows(text_encoder, token_ids)        # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW([rows.weight], lr=1e-3)  # doctest: +SKIP
    """

    def __init__(self, text_encoder: torch.nn.Module, token_ids: Sequence[int]) -> None:
        self.weight = text_encoder.get_input_embeddings().weight
        self.weight.requires_grad_(True)
        self.original = self.weight.detach().clone()
        self.frozen = torch.ones(self.weight.shape[0], dtype=torch.bool)
        self.frozen[list(token_ids)] = False

    def restore(self, text_encoder: torch.nn.Module) -> None:
        """Put back every row but the new tokens' (``text_encoder`` unwrapped from DDP)."""
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            rows = self.frozen.to(weight.device)
            weight[rows] = self.original.to(weight)[rows]
