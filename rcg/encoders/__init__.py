"""The frozen self-supervised encoder (docs/paper.md#representation): MoCo v3 ViT + projector.

`load_encoder(model_dir)` gives the frozen `RepEncoder` every later stage uses: images in [0, 1]
-> standardised 256-d representation. `checkpoints` converts official MoCo v3 / DINO / iBOT / DeiT
files; `moco` pretrains a MoCo v3 encoder when there is no checkpoint.
"""

from rcg.encoders.vit import (
    ENCODER_ARCHS,
    EncoderSpec,
    RepEncoder,
    encoder_spec,
    load_encoder,
    save_encoder,
)

__all__ = ["ENCODER_ARCHS", "EncoderSpec", "RepEncoder", "encoder_spec", "load_encoder", "save_encoder"]
