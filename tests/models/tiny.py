"""A tiny ViT for model tests (CPU, random weights)."""

from gist_exp.models import build_model

BACKBONE = dict(name="vit_tiny_patch16_224", weights="random",
                model_args=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0))
GIST_ON = dict(enabled=True, head="shared", predict="cls", init_range=0.5, dropout=0.1)
GIST_OFF = dict(enabled=False)


def tiny(peft: dict, gist: dict = GIST_OFF, num_classes: int = 5, drop_path_rate: float = 0.0):
    return build_model(BACKBONE, peft, gist, num_classes, drop_path_rate)
