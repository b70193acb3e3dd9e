"""The config groups compose as documented (Hydra's compose API on conf/)."""

from omegaconf import OmegaConf


def test_defaults_are_the_gist_paper_setup(make_cfg):
    cfg = make_cfg()
    assert (cfg.task.name, cfg.peft.name, cfg.gist.enabled, cfg.recipe.name) == ("dtd", "adapter", True, "gist_paper")
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k" and cfg.backbone.weights == "hub"
    assert cfg.data.normalization == "0.5" and cfg.data.pipeline == "cached" and cfg.protocol == "final"


def test_per_task_values_are_resolved_inside_the_job(make_cfg):
    clevr = make_cfg("task=clevr_dist", "peft=vpt")
    assert (clevr.recipe.lr, clevr.recipe.weight_decay, clevr.recipe.drop_path) == (5e-2, 5e-2, 0.1)
    assert clevr.peft.num_prompts == 200
    flowers = make_cfg("task=oxford_flowers102", "peft=vpt")
    assert (flowers.recipe.lr, flowers.recipe.weight_decay, flowers.recipe.drop_path, flowers.peft.num_prompts) == (
        5e-3, 5e-5, 0.0, 1)
    assert make_cfg("task=dtd", "recipe.lr=0.001").recipe.lr == 0.001
    noah = make_cfg("recipe=noah", "task=svhn")
    assert (noah.recipe.lr, noah.recipe.weight_decay, noah.recipe.min_lr) == (1e-3, 1e-4, 1e-5)


def test_experiments_override_the_base_config(make_cfg):
    demo = make_cfg("experiment=demo")
    assert demo.sweep_name == "demo" and demo.backbone.name == "vit_tiny_patch16_224" and demo.trainer.max_epochs == 10
    full = OmegaConf.to_container(make_cfg("experiment=vtab_full"), resolve=False)
    assert full["sweep_name"] == "vtab_full"


def test_every_task_has_a_config_and_a_recipe_row(make_cfg):
    from gist_exp.data.tasks import TASKS
    for name in TASKS:
        cfg = make_cfg(f"task={name}", "peft=vpt")
        assert cfg.task.name == name and cfg.recipe.lr > 0 and cfg.peft.num_prompts >= 1
