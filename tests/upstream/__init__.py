"""Minimal copies of diffusers' example training scripts, in their shape, with the DVAR lines of
docs/diffusers-scripts.md inserted (every inserted line ends with ``# DVAR``).

They keep what matters for early stopping: argparse flags of the same names, a real
``accelerate.Accelerator``, ``accelerator.accumulate``/``sync_gradients``, the epoch loop and
inner loop, the checkpointing block, the script's own dataset class and the save after the
loop. They load the tiny random pipeline that ``--pretrained_model_name_or_path`` points at and
return (and write to ``result_rank{N}.json`` in the output folder) what the tests check.
"""
