"""Where the parts of a transformer are: its block list (PEFT's ``layers_pattern`` conventions) and the final norm."""

from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["LAYERS_PATTERNS", "find_blocks", "find_final_norm"]

LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def find_blocks(model: nn.Module, layers_pattern: Optional[str] = None) -> tuple[str, nn.ModuleList]:
    """Find the transformer block list (PEFT's ``layers_pattern`` conventions); the encoder's for seq2seq models."""
    patterns = (layers_pattern,) if layers_pattern else LAYERS_PATTERNS
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and name.rsplit(".", 1)[-1] in patterns
    ]
    # a block may hold its own ModuleList named like a block list (T5Block.layer): keep the outermost lists only
    found = [(n, m) for n, m in found if not any(n.startswith(other + ".") for other, _ in found)]
    if len(found) > 1:
        encoder = [(n, m) for n, m in found if "encoder" in n.split(".")]
        found = encoder or found
    if len(found) != 1:
        listed = [n for n, _ in found]
        raise ValueError(
            f"could not find a unique list of transformer blocks named {list(patterns)} in "
            f"{type(model).__name__} (candidates: {listed}); set `layers_pattern` in the ASRConfig to the name of the "
            "`nn.ModuleList` holding the blocks."
        )
    return found[0]


def find_final_norm(model: nn.Module, blocks_name: str) -> nn.Module:
    """The normalisation applied after the block list by its parent (``norm``, ``ln_f``, ``final_layer_norm``...).

    Post-norm encoders such as BERT have none; the hidden states are then used as they are.
    """
    parent_name, _, child = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    after = False
    for name, module in parent.named_children():
        if name == child:
            after = True
        elif after and "norm" in type(module).__name__.lower():
            return module
    return nn.Identity()
