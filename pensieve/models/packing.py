"""HF checkpoint names → a model's fused parameters (q/k/v → qkv, gate/up → gate_up)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def pack_weights(
    weights: Mapping[str, torch.Tensor], packed: Mapping[str, tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """Concatenate the rows of each group of HF parameters into the fused one (a stacked
    expert weight [E, rows, K] along its rows).

    ``packed`` maps a fused module suffix (``self_attn.qkv_proj``) to the HF module
    suffixes it replaces; weights and biases are both handled. Other names pass through.
    """
    out = dict(weights)
    for fused, parts in packed.items():
        # by weight or by bias: a weight kept as quantised codes is not in ``weights``
        prefixes = {n[: -len(f"{parts[0]}.{kind}")] for kind in ("weight", "bias")
                    for n in weights if n.endswith(f".{parts[0]}.{kind}")}
        for prefix in sorted(prefixes):
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{p}.{kind}" for p in parts]
                if all(k in out for k in keys):
                    # rows: a weight's second-last dim, a bias's last (stacked experts' [E, rows])
                    out[f"{prefix}{fused}.{kind}"] = torch.cat([out.pop(k) for k in keys],
                                                               dim=-2 if kind == "weight" else -1)
    return out
