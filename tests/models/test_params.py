"""Parameter accounting for ViT-B/16 (random weights, no download): the numbers the papers report."""

import pytest
from omegaconf import OmegaConf

from gist_exp.data import get_task
from gist_exp.models import build_model, count_parameters


def vit_b(make_cfg, *overrides):
    cfg = OmegaConf.to_container(make_cfg("backbone.weights=random", *overrides), resolve=True)
    task = get_task(cfg["task"]["name"])
    return build_model(cfg["backbone"], cfg["peft"], cfg["gist"], task.num_classes, cfg["recipe"]["drop_path"])


@pytest.mark.parametrize("peft, expected", [
    ("adapter", 12 * (768 * 4 + 4 + 4 * 768 + 768)),   # 82,992
    ("lora", 12 * (768 * 8 + 8 * 2304)),               # 294,912
    ("vpt", 10 * 12 * 768),                            # dtd: 10 prompts x 12 layers = 92,160
    ("linear", 0),
])
def test_vit_b16_counts_with_gist(make_cfg, peft, expected):
    params = count_parameters(vit_b(make_cfg, f"peft={peft}", "task=dtd"))
    assert params["gist"] == 768
    assert params["peft"] == expected
    assert params["trainable_excl_head"] == expected + 768
    assert params["head"] == 768 * 47 + 47
    assert params["trainable_total"] == expected + 768 + 768 * 47 + 47


def test_gist_off_has_no_token_and_paper_counts(make_cfg):
    assert count_parameters(vit_b(make_cfg, "peft=adapter", "gist=off"))["trainable_excl_head"] == 82_992
    assert count_parameters(vit_b(make_cfg, "peft=lora", "gist=off"))["trainable_excl_head"] == 294_912


def test_variants_and_separate_head(make_cfg):
    sequential = count_parameters(vit_b(make_cfg, "peft=adapter", "peft.variant=sequential_mlp", "gist=off"))
    assert sequential["peft"] == 12 * (768 * 8 + 8 + 8 * 768 + 768)  # 156,768: NOAH's 0.16M
    qv = count_parameters(vit_b(make_cfg, "peft=lora", "peft.targets=[q,v]", "gist=off"))
    assert qv["peft"] == 12 * 2 * (768 * 8 + 8 * 768)
    separate = count_parameters(vit_b(make_cfg, "peft=adapter", "gist.head=separate", "task=eurosat"))
    assert separate["head"] == 2 * (768 * 10 + 10)
    assert separate["trainable_excl_head"] == 82_992 + 768


def test_vpt_prompt_length_follows_the_task(make_cfg):
    params = count_parameters(vit_b(make_cfg, "peft=vpt", "task=clevr_dist", "gist=off"))
    assert params["peft"] == 200 * 12 * 768
    shallow = count_parameters(vit_b(make_cfg, "peft=vpt", "peft.mode=shallow", "task=dtd", "gist=off"))
    assert shallow["peft"] == 10 * 768
