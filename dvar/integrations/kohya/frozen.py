"""The DVAR batch for kohya: the user's own training examples, read once through kohya's dataset.

kohya's dataset items are already batches (a dict per bucket batch: cached ``latents`` or
``images``, ``input_ids_list`` or cached ``text_encoder_outputs_list``, ``captions``,
``loss_weights``, ...), exactly what ``NetworkTrainer.process_batch`` takes. The frozen batch is
the first few of those items, read once with privately seeded random generators (flips, crops,
caption shuffles are drawn once), so every evaluation runs kohya's own code on the same inputs.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dvar.batch import isolated_global_rng

Item = Dict[str, Any]


def item_size(item: Item) -> int:
    """Number of examples in one kohya batch dict."""
    captions = item.get("captions")
    if captions is not None:
        return len(captions)
    return int(item["loss_weights"].shape[0])


def item_image_keys(dataset: Any, index: int) -> Optional[List[Tuple[str, bool]]]:
    """``(image key, is_reg)`` of the examples in ``dataset[index]``, from kohya's bucket tables.

    Mirrors the first lines of kohya's ``BaseDataset.__getitem__``; None for datasets without
    buckets (``--dataset_class``), which are then read in plain index order.
    """
    datasets = getattr(dataset, "datasets", None)
    if datasets is None:
        datasets, local = [dataset], index
    else:
        offsets = [0] + list(dataset.cumulative_sizes)
        which = int(np.searchsorted(offsets, index, side="right")) - 1
        datasets, local = [datasets[which]], index - offsets[which]
    sub = datasets[0]
    try:
        batch_index = sub.buckets_indices[local]
        bucket = sub.bucket_manager.buckets[batch_index.bucket_index]
        start = batch_index.batch_index * batch_index.bucket_batch_size
        keys = bucket[start : start + batch_index.bucket_batch_size]
        return [(key, bool(sub.image_data[key].is_reg)) for key in keys]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None


def candidate_order(dataset: Any) -> List[int]:
    """Dataset indices in the order DVAR freezes them: items of training images not seen in an
    earlier item first, then repeats, then items that mix in regularization images; items of
    regularization images only are left out. Plain index order for datasets without buckets."""
    fresh: List[int] = []
    repeats: List[int] = []
    mixed: List[int] = []
    seen: set = set()
    for index in range(len(dataset)):
        keys = item_image_keys(dataset, index)
        if keys is None:
            return list(range(len(dataset)))
        regs = [is_reg for _, is_reg in keys]
        if all(regs):
            continue
        target = mixed if any(regs) else (repeats if all(key in seen for key, _ in keys) else fresh)
        target.append(index)
        seen.update(key for key, _ in keys)
    return fresh + repeats + mixed


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().cpu()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_clone(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


class KohyaFrozenBatch:
    """The frozen DVAR inputs: kohya batch dicts, each evaluated with its own fixed seed.

    Use :meth:`from_dataset` to read them; ``next()`` returns the batch itself (nothing is
    redrawn), ``shard`` splits the items across processes, and the items travel in
    ``state_dict()`` so that a resumed run evaluates exactly the same inputs.

    Example:
        >>> batch = KohyaFrozenBatch.from_dataset(train_dataset_group, num_examples=4)  # doctest: +SKIP
        >>> len(batch), [item_size(item) for item in batch.items]  # doctest: +SKIP
        (4, [1, 1, 1, 1])
    """

    def __init__(self, items: Sequence[Item], seed: int = 0, indices: Sequence[int] = ()) -> None:
        if not items:
            raise ValueError("The frozen DVAR batch needs at least one training example.")
        self.items = list(items)
        self.seed = seed
        self.indices = list(indices)

    @classmethod
    def from_dataset(cls, dataset: Any, num_examples: int, seed: int = 0) -> "KohyaFrozenBatch":
        """Read the chosen items of kohya's (training) dataset group with privately seeded
        global generators, leaving the training run's random streams untouched."""
        if num_examples < 1:
            raise ValueError(f"--early_stop_batch_size must be >= 1 (got {num_examples}).")
        items: List[Item] = []
        indices: List[int] = []
        with isolated_global_rng(seed=seed):
            for index in candidate_order(dataset):
                if sum(item_size(item) for item in items) >= num_examples:
                    break
                items.append(_clone(dataset[index]))
                indices.append(index)
        if not items:
            raise ValueError("No training images to freeze for DVAR: the dataset holds only regularization images.")
        return cls(items, seed=seed, indices=indices)

    def item_seed(self, position: int) -> int:
        """The fixed seed under which item ``position`` draws its noise and timesteps."""
        return (self.seed * 1_000_003 + 7919 * (position + 1)) % (2**31 - 1)

    # -- the batch protocol of DVAREarlyStopping --------------------------------------------

    def next(self) -> "KohyaFrozenBatch":
        return self

    def __len__(self) -> int:
        return sum(item_size(item) for item in self.items)

    def shard(self, rank: int, world_size: int) -> "KohyaShard":
        """Contiguous items of process ``rank`` (whole kohya batches; shares differ by one item at most)."""
        positions = list(range(self.shard_start(rank, world_size), self.shard_start(rank + 1, world_size)))
        return KohyaShard([self.items[p] for p in positions], [self.item_seed(p) for p in positions])

    def shard_start(self, rank: int, world_size: int) -> int:
        """The item at which process ``rank``'s share starts (``rank == world_size``: the number of items).
        ``signal="normalized"`` follows each item's loss (kohya's loss is one number per batch)."""
        return int(np.linspace(0, len(self.items), world_size + 1).round().astype(int)[rank])

    def captions(self) -> List[str]:
        return [caption for item in self.items for caption in (item.get("captions") or [])]

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {"seed": self.seed, "indices": list(self.indices), "items": self.items}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"The checkpoint froze its DVAR batch with seed {state['seed']}, this run with {self.seed}.")
        self.items = list(state["items"])
        self.indices = list(state["indices"])

    def __repr__(self) -> str:
        return f"KohyaFrozenBatch(items={len(self.items)}, examples={len(self)}, indices={self.indices})"


class KohyaShard:
    """The items one process evaluates, with their fixed seeds."""

    def __init__(self, items: List[Item], seeds: List[int]) -> None:
        self.items, self.seeds = items, seeds

    def __len__(self) -> int:
        return sum(item_size(item) for item in self.items)
