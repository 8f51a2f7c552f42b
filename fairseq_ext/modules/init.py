"""Transformer-XL's ``weights_init`` (the original code's, also lmtool's), shared by the models that follow it."""
from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def xl_weights_init(model: nn.Module, init_std: float, proj_init_std: float,
                    normal_leaves: Sequence[str] = ()) -> None:
    """N(0, init_std) Linear / Embedding weights, N(1, init_std) LayerNorm gains, zero biases; then, by parameter
    name: N(0, init_std) for the adaptive softmax's ``cluster_weight``, its untied output word matrices
    (``adaptive_softmax.weights.*``) and every parameter whose last name is in ``normal_leaves`` (e.g. the
    relative-attention biases), zero ``cluster_bias`` and ``adaptive_softmax.bias``, N(0, proj_init_std) adaptive
    projections (``embed_tokens.emb_projs.*``, ``adaptive_softmax.out_projs.*``). Tied tensors are initialised
    once, as embeddings (``named_parameters`` lists a shared tensor once). A Linear with ``fused_parts`` = n (e.g.
    Transformer-XL's ``qkv_proj``) draws its n row blocks one after another, as n separate Linears would."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            for part in module.weight.chunk(getattr(module, "fused_parts", 1)):  # a fused Linear: drawn per part
                nn.init.normal_(part, 0.0, init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, 1.0, init_std)
            nn.init.zeros_(module.bias)
    normal = ("cluster_weight", *normal_leaves)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in normal:
            nn.init.normal_(param, 0.0, init_std)
        elif leaf == "cluster_bias" or name == "adaptive_softmax.bias":
            nn.init.zeros_(param)
        elif name.startswith("adaptive_softmax.weights."):  # untied output word matrices
            nn.init.normal_(param, 0.0, init_std)
        elif name.startswith(("embed_tokens.emb_projs.", "adaptive_softmax.out_projs.")):
            nn.init.normal_(param, 0.0, proj_init_std)
