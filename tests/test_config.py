"""The typed config loader and the shipped configs."""

from pathlib import Path

import pytest
import torch

from worldmodel.run.config import ConfigError, ModelConfig, config_from_dict, load_config, save_config
from worldmodel.train.setup import resolve_mixed_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "demo", "gpu_vits"])
def test_shipped_configs_load_and_point_at_the_default_data(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.train_shards == "data/moving_digits/train/shard-*.tar"
    assert cfg.data.val_shards == "data/moving_digits/val/shard-*.tar"
    assert cfg.data.image_size <= 64  # the default data is 64x64: resize down, never up


@pytest.mark.parametrize(
    ("name", "vit_s"), [("gpu_vits", "vit_small_patch8_224"), ("gpu_vits224", "vit_small_patch16_224")]
)
def test_gpu_configs_build_a_vit_s_encoder_whose_weights_load(name, vit_s):
    """The GPU configs' encoder is timm's ViT-S (at the config's patch and image size, no class token, no head):
    the same parameter names and shapes and the same heads, so ViT-S weights load through model.init_weights.
    Built on the meta device: no memory, no download."""
    from timm import create_model

    from worldmodel.model.encoder import build_vit

    cfg = load_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        ours = build_vit(cfg.model)
        reference = create_model(
            vit_s, pretrained=False, img_size=cfg.data.image_size, class_token=False, global_pool="", num_classes=0
        )
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert ours.blocks[0].attn.num_heads == reference.blocks[0].attn.num_heads


def test_dotted_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.latent=none", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]"])
    assert cfg.model.latent == "none" and cfg.optim.lr == 3e-4 and cfg.optim.betas == [0.8, 0.9]
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim.lrr .*valid keys: optim.lr, optim.min_lr"):
        load_config(CONFIGS / "tiny.yaml", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="valid keys: run_dir, seed, data, model, optim, train, eval"):
        load_config(CONFIGS / "tiny.yaml", ["trian.steps=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=many", "train.steps must be an integer"),
        ("train.compile=1", "train.compile must be true or false"),
        ("model.latent=vae", "model.latent='vae' is not one of none, adassl_v, adassl_s, oracle"),
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not one of"),
        ("model.granularity=pixels", "model.granularity=.pixels. is not one of frame, tokens"),
        ("model.beta_warmup_steps=-1", "model.beta_warmup_steps=-1 must be >= 0"),
        ("model.beta=-0.1", "model.beta=-0.1 must be >= 0"),
        ("model.smooth_weight=-1", "model.smooth_weight=-1.0 must be >= 0"),
        ("model.target_scale=batch", "model.target_scale=.batch. is not one of frame, running"),
        ("lr", "must look like section.key=value"),
    ],
)
def test_bad_values_fail_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_the_smoothness_term_needs_clips_of_three_frames():
    with pytest.raises(ConfigError, match="model.smooth_weight=0.5 weighs an acceleration.*at least 3 frames"):
        load_config(
            CONFIGS / "tiny.yaml",
            ["model.smooth_weight=0.5", "data.num_context=1", "data.num_target=1", "eval.horizon=1"],
        )
    load_config(
        CONFIGS / "tiny.yaml", ["model.smooth_weight=0.5", "data.num_context=2", "data.num_target=1", "eval.horizon=1"]
    )


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["model.latent=oracle", "model.action_dim=2", "data.image_size=48"])
    save_config(cfg, tmp_path / "config.yaml")
    assert "img_size" not in (tmp_path / "config.yaml").read_text()  # a run's config holds config keys only
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(tmp_path / "config.yaml").model.img_size == 48


def test_the_model_takes_its_image_size_from_data_image_size():
    """One image size: a config that sets data.image_size alone builds a model for frames of that size, and
    data.image_size overridden on the command line moves the model with it."""
    from worldmodel.model.world_model import WorldModel

    small = {"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "latent": "none", "pred_dim": 48}
    cfg = config_from_dict({"data": {"image_size": 64}, "model": small})
    assert cfg.model.img_size == 64
    torch.manual_seed(0)
    model = WorldModel(cfg.model)
    assert model.encoder.vit.patch_embed.grid_size == (8, 8)
    assert torch.isfinite(model(torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8))["loss"])
    with pytest.raises(ValueError, match=r"frames must be \[B, T, 64, 64, C\]"):
        model(torch.zeros(2, 4, 32, 32, 3, dtype=torch.uint8))
    assert load_config(CONFIGS / "tiny.yaml", ["data.image_size=32"]).model.img_size == 32


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_model_img_size_is_no_config_key_and_the_error_names_data_image_size(where, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  image_size: 64\nmodel:\n  img_size: 64\n" if where == "yaml" else "seed: 0\n")
    overrides = ["model.img_size=64"] if where == "override" else []
    with pytest.raises(ConfigError, match=r"model.img_size is not a config key.*set data.image_size instead"):
        load_config(path, overrides)
    with pytest.raises(ConfigError, match="valid keys: model.latent, model.patch_size, ") as err:
        load_config(None, ["model.img_sise=64"])
    assert "model.img_size" not in str(err.value)  # not offered as a key either


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=0", "data.image_size=0: the model is built for one frame size"),
        ("data.image_size=40", "data.image_size=40 is not a multiple of model.patch_size=16"),
    ],
)
def test_an_image_size_the_model_cannot_take_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", [override])


def test_mixed_precision_auto_is_bf16_only_with_cuda():
    assert resolve_mixed_precision("auto") == ("bf16" if torch.cuda.is_available() else "no")
    assert resolve_mixed_precision("fp16") == "fp16"


def test_a_removed_key_is_an_unknown_key_even_at_its_old_default():
    """A config written before a key was removed (a run's config.yaml) no longer loads: the key is unknown and the
    error names the valid keys."""
    removed = [("model", "objective", "jepa"), ("model", "in_chans", 3), ("train", "debug_dump_state", False)]
    for section, key, old in removed:
        with pytest.raises(ConfigError, match=rf"unknown config key\(s\) {section}\.{key} .*valid keys: {section}\."):
            config_from_dict({section: {key: old}})


def test_push_config_points_at_the_push_world_and_its_keypoint_model_trains_a_step():
    """configs/push.yaml: the demo recipe on the push world with the keypoint frame head (sub-cells too) and its
    conditional reconstruction; one backward step reaches both kinds of keypoint scores (the head is not a dead end,
    the zero-initialised sub-cell scores included), the loss is finite."""
    from worldmodel.model.world_model import WorldModel

    cfg = load_config(CONFIGS / "push.yaml", ["model.latent=none"])
    assert cfg.data.train_shards == "data/push_world/train/shard-*.tar" and cfg.model.frame_head == "keypoints"
    torch.manual_seed(0)
    model = WorldModel(cfg.model)
    size = cfg.model.img_size
    frames = torch.randint(0, 256, (2, cfg.data.clip_length, size, size, 3), dtype=torch.uint8)
    out = model(frames)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for scores in (model.encoder.head.score, model.encoder.head.sub_score):  # the patch and the sub-cell scores
        grad = scores[1].weight.grad
        assert grad is not None and grad.abs().sum() > 0
    assert cfg.model.recon_weight > 0 and torch.isfinite(out["terms"]["recon"])  # the conditional reconstruction


def test_recon_weight_needs_the_keypoint_head_and_a_non_negative_weight():
    """model.recon_weight rebuilds frames from keypoints: with the linear head, or a negative weight, the model
    refuses to build with a message naming the key."""
    from worldmodel.model.world_model import WorldModel

    small = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "latent": "none"}
    with pytest.raises(ValueError, match="needs model.frame_head=keypoints"):
        WorldModel(ModelConfig(**small, recon_weight=1.0))
    with pytest.raises(ValueError, match="recon_weight must be >= 0"):
        WorldModel(ModelConfig(**small, frame_head="keypoints", recon_weight=-1.0))
    with pytest.raises(
        ValueError, match="recon_mask=0.5 and model.recon_sigma_start=0.0 shape the reconstruction, which is off"
    ):
        WorldModel(ModelConfig(**small, frame_head="keypoints", recon_mask=0.5))
    with pytest.raises(ValueError, match="recon_sigma_start=0.3 shape the reconstruction, which is off"):
        WorldModel(ModelConfig(**small, frame_head="keypoints", recon_sigma_start=0.3))
    with pytest.raises(ValueError, match="must be >= 0"):
        WorldModel(ModelConfig(**small, frame_head="keypoints", recon_weight=1.0, recon_sigma_start=-0.3))


def test_pred_trains_encoder_false_leaves_the_encoder_to_the_reconstruction():
    """model.pred_trains_encoder=false: the prediction loss reaches the predictor but not the encoder, the
    reconstruction still reaches the encoder; without a reconstruction the model refuses to build."""
    from worldmodel.model.world_model import WorldModel

    small = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "latent": "none"}
    with pytest.raises(ValueError, match="pred_trains_encoder=false leaves the encoder only the reconstruction"):
        WorldModel(ModelConfig(**small, frame_head="keypoints", pred_trains_encoder=False))
    frames = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def grad_sums(pred_trains_encoder: bool, term: str) -> tuple[float, float]:
        torch.manual_seed(0)
        cfg = ModelConfig(**small, frame_head="keypoints", recon_weight=1.0, pred_trains_encoder=pred_trains_encoder)
        model = WorldModel(cfg)
        model(frames)["terms"][term].backward()
        return tuple(
            sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)
            for module in (model.encoder, model.predictor)
        )

    assert grad_sums(True, "pred")[0] > 0  # by default the prediction loss trains the encoder too
    encoder, predictor = grad_sums(False, "pred")
    assert encoder == 0 and predictor > 0
    assert grad_sums(False, "recon")[0] > 0
