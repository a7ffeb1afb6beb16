"""Swaps of our kernels into the models users already run, one file per model family:

- `released_moepp`: the MoE++ authors' released model (MoE++-7B's `MoeForCausalLM`);
  `replace_moepp_layers` / `restore_moepp_layers`, also exported by moepp_kernels.
- `longcat_flash`: transformers' LongCat-Flash; `replace_longcat_flash_moe` /
  `restore_longcat_flash_moe`.

Each swap is an explicit call on a model instance (no class patching) and returns
the swapped module names. Nothing here imports transformers.
"""

from .longcat_flash import LongcatFlashMoEPP, replace_longcat_flash_moe, restore_longcat_flash_moe
from .released_moepp import (
    ReleasedMoEPPLayer,
    config_from_released_module,
    replace_moepp_layers,
    restore_moepp_layers,
)

__all__ = [
    "LongcatFlashMoEPP",
    "ReleasedMoEPPLayer",
    "config_from_released_module",
    "replace_longcat_flash_moe",
    "replace_moepp_layers",
    "restore_longcat_flash_moe",
    "restore_moepp_layers",
]
