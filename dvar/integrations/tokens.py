"""New tokens in the CLIP tokenizer: checks, initialisation, and diffusers-loadable files."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file

from .data import UsageError

ROWS_KEY = "dvar_token_rows"  # in an optimizer state dict: the table's state holds only these rows


def _is_rows(value: Any, count: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count


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

    def checkpoint_only_new_rows(self, optimizer: torch.optim.Optimizer) -> None:
        """Checkpoints of ``optimizer`` keep only the new rows' state of the table (AdamW's moments of the
        whole table are 2x its size, 250x a one-token embedding on SD), and restore the full shape on load.

        Resuming stays exact: AdamW works element by element, and the other rows are put back after
        every step, so their moments never reach a trained value."""
        if not hasattr(optimizer, "register_state_dict_post_hook"):  # torch < 2.1: full state, still correct
            return
        rows = [i for i in range(self.weight.shape[0]) if not self.frozen[i]]
        num_rows = self.weight.shape[0]

        def table_id(state_dict: Dict[str, Any]) -> Optional[int]:
            for group, saved in zip(optimizer.param_groups, state_dict["param_groups"]):
                for param, param_id in zip(group["params"], saved["params"]):
                    if param is self.weight:
                        return param_id
            return None

        def slim(opt: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
            param_id = table_id(state_dict)
            entry = state_dict["state"].get(param_id)
            if entry is None:  # no step taken yet
                return state_dict
            state_dict["state"] = dict(state_dict["state"])  # the optimizer's own dicts stay untouched
            state_dict["state"][param_id] = {
                key: value[rows].clone() if _is_rows(value, num_rows) else value for key, value in entry.items()
            }
            state_dict[ROWS_KEY] = {"param_id": param_id, "rows": rows, "num_rows": num_rows}
            return state_dict

        def expand(opt: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
            info = state_dict.pop(ROWS_KEY, None)
            if info is None:  # a full-size state (a checkpoint of an older dvar)
                return state_dict
            if info["num_rows"] != num_rows or info["rows"] != rows:
                raise ValueError(
                    f"The checkpoint's optimizer state is for token rows {info['rows']} of {info['num_rows']}, this "
                    f"run trains {rows} of {num_rows}: resume with the same model and tokens."
                )
            state = dict(state_dict["state"])
            entry = state[info["param_id"]]
            full = {}
            for key, value in entry.items():
                if _is_rows(value, len(rows)) and key != "step":
                    grown = value.new_zeros((num_rows, *value.shape[1:]))
                    grown[rows] = value
                    value = grown
                full[key] = value
            state[info["param_id"]] = full
            state_dict["state"] = state
            return state_dict

        optimizer.register_state_dict_post_hook(slim)
        optimizer.register_load_state_dict_pre_hook(expand)

    def restore(self, text_encoder: torch.nn.Module) -> None:
        """Put back every row but the new tokens' (``text_encoder`` unwrapped from DDP)."""
        weight = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            rows = self.frozen.to(weight.device)
            weight[rows] = self.original.to(weight)[rows]
