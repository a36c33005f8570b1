"""Networks: shapes, checkpoints, offline pretrained weights, rectangular ViT patches, freezing."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from psearch.engine.errors import UsageError
from psearch.writer_id import backbones, model
from psearch.writer_id.model import ModelSpec, build_model
from psearch.writer_id.builtin import KIND, WriterOptions

CONVNEXT_FILE = os.path.basename(torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.url)
VIT_FILE = os.path.basename(torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1.url)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """An empty torch cache, and any attempt to download fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", no_download)


def _legacy_mlp_name(key: str) -> str:
    # torchvision's released ViT files predate its MLP renaming (mlp.linear_1 -> mlp.0);
    # saving the fake file the old way checks that such a file still loads.
    return key.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2.")


# Kept whole: the ViT loader resamples these, and the tests check the result value by value.
RESAMPLED = ("conv_proj.weight", "encoder.pos_embedding")


def _fake_weights(builder) -> dict[str, torch.Tensor]:
    """Random tensors with the keys and shapes of a torchvision model's state dict, a few MB on
    disk instead of hundreds: each large tensor (except RESAMPLED) repeats one random row of its
    own (an expanded tensor is saved as that row), which loading copies like any other."""
    with torch.device("meta"):  # names and shapes only: no weights are initialised
        shapes = {k: v.shape for k, v in builder().state_dict().items()}
    gen = torch.Generator().manual_seed(0)

    def fake(key, shape):
        large = shape.numel() > 10_000 and key not in RESAMPLED
        return (0.02 * torch.randn(shape[-1:] if large else shape, generator=gen)).expand(shape)

    return {k: fake(k, shape) for k, shape in shapes.items()}


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A TORCH_HOME whose hub cache holds random weights files of torchvision's layout."""
    home = tmp_path_factory.mktemp("torch_home")
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    convnext = _fake_weights(torchvision.models.convnext_tiny)
    vit = _fake_weights(torchvision.models.vit_b_16)
    torch.save(convnext, folder / CONVNEXT_FILE)
    torch.save({_legacy_mlp_name(k): v for k, v in vit.items()}, folder / VIT_FILE)
    return {"home": str(home), "convnext": convnext, "vit": vit}


@pytest.mark.parametrize("model_type,size", [("small", (32, 256)), ("convnext", (32, 256)),
                                             ("vit", (32, 128))])
def test_forward_shapes_and_unit_norm(model_type, size):
    spec = ModelSpec(model_type, num_classes=5, embedding_dim=24, img_height=size[0],
                     img_width=size[1], pretrained=False)
    net = build_model(spec)
    x = torch.rand(3, 1, *size)
    for training in (True, False):
        net.train(training)
        with torch.no_grad():
            emb, logits = net(x)
        assert emb.shape == (3, 24) and logits.shape == (3, 5)
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
        assert torch.isfinite(logits).all()


def test_checkpoint_round_trip(tmp_path):
    spec = ModelSpec("small", num_classes=3, embedding_dim=16, img_height=32, img_width=256)
    net = build_model(spec)
    x = torch.rand(4, 1, 32, 256)
    net.train()
    net(x)  # moves the BatchNorm running statistics away from their initial values
    net.eval()
    with torch.no_grad():
        expected = net(x)
    path = tmp_path / "best_model.pth"
    extra = {"epoch": 7, "val": {"page_top1": np.float64(0.5), "per_epoch": np.arange(2)}}
    model.save_torch(model.checkpoint_payload(net, ["w1", "w2", "w3"], extra), path)
    loaded, writers, meta = model.load_best_model(path)  # weights_only: numpy made plain
    assert not loaded.training and loaded.spec == spec
    assert writers == ["w1", "w2", "w3"]
    assert meta["model_spec"] == spec.to_dict()
    assert meta["epoch"] == 7 and meta["val"] == {"page_top1": 0.5, "per_epoch": [0, 1]}
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.checkpoint_payload(net, ["w1", "w2", "w3"], {"writers": []})


def test_checkpoints_that_name_the_hyperparameters_hparams_still_load(tmp_path):
    # best_model.pth of older versions stored the trial's hyperparameters under "hparams"
    net = build_model(ModelSpec("small", num_classes=2, img_height=32, img_width=128))
    hp = {"model_type": "small", "lr": 1e-3}
    path = tmp_path / "best_model.pth"
    model.save_torch(model.checkpoint_payload(net, ["a", "b"], {"hparams": hp, "epoch": 3}), path)
    _, writers, meta = model.load_best_model(path)
    assert meta["hyperparameters"] == hp and "hparams" not in meta
    assert writers == ["a", "b"] and meta["epoch"] == 3


@pytest.mark.parametrize("model_type,file", [("convnext", CONVNEXT_FILE), ("vit", VIT_FILE)])
def test_missing_pretrained_weights_raise_one_line_with_the_fix(model_type, file):
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    assert "empty_torch_home" in folder
    with pytest.raises(backbones.PretrainedWeightsMissing) as err:
        backbones.ensure_pretrained_available(model_type)
    message = str(err.value)
    assert isinstance(err.value, UsageError) and "\n" not in message
    for part in (file, folder, "TORCH_HOME", "--no_pretrained", "weights='IMAGENET1K_V1'"):
        assert part in message
    with pytest.raises(backbones.PretrainedWeightsMissing):
        build_model(ModelSpec(model_type, num_classes=2, img_height=32, img_width=128))
    backbones.ensure_pretrained_available("small")  # nothing to fetch
    with pytest.raises(UsageError, match="unknown model type"):
        backbones.ensure_pretrained_available("resnet")


def test_convnext_loads_cached_weights(fake_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", fake_hub["home"])
    net = build_model(ModelSpec("convnext", num_classes=4, img_height=32, img_width=256))
    got = net.backbone.state_dict()
    for key, value in fake_hub["convnext"].items():
        if not key.startswith("classifier.2."):  # the 1000-way ImageNet classifier is dropped
            torch.testing.assert_close(got[key.replace("classifier.0.", "norm.")], value)


def test_vit_loads_cached_weights_with_rectangular_patches(fake_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", fake_hub["home"])
    net = build_model(ModelSpec("vit", num_classes=4, img_height=32, img_width=128,
                                vit_patch=(16, 32)))
    vit, got = fake_hub["vit"], net.backbone.state_dict()
    for key, value in vit.items():
        if key.startswith(("encoder.layers.", "encoder.ln.", "class_token", "conv_proj.bias")):
            torch.testing.assert_close(got[key], value)
    pos = got["encoder.pos_embedding"]
    assert pos.shape == (1, 1 + 2 * 4, 768)  # class token + a 2 x 4 grid of 16 x 32 patches
    torch.testing.assert_close(pos[:, 0], vit["encoder.pos_embedding"][:, 0])
    # Pseudo-inverse resize: a 16 x 32 patch that is a 16 x 16 patch stretched in width gets the
    # token the pretrained 16 x 16 kernel gave the original patch.
    patch = torch.rand(2, 3, 16, 16)
    stretched = F.interpolate(patch, size=(16, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(F.conv2d(stretched, got["conv_proj.weight"]),
                               F.conv2d(patch, vit["conv_proj.weight"]), atol=1e-4, rtol=1e-4)


def test_position_embedding_resampling():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    torch.testing.assert_close(backbones.resample_pos_embedding(pos, (14, 14)), pos)
    # An embedding that varies only along the width must still vary only along the width.
    by_column = torch.randn(1, 1, 14, 8).expand(1, 14, 14, 8).reshape(1, 196, 8)
    out = backbones.resample_pos_embedding(torch.cat([pos[:, :1], by_column], 1), (10, 55))
    grid = out[:, 1:].reshape(10, 55, 8)
    assert out.shape == (1, 551, 8)
    torch.testing.assert_close(grid, grid[:1].expand(10, 55, 8))
    torch.testing.assert_close(out[:, 0], pos[:, 0])


def test_vit_sizes_must_be_multiples_of_the_patch():
    # Checked before the weights and before anything large is built.
    spec = ModelSpec("vit", num_classes=2, img_height=150, img_width=1750, vit_patch=(16, 32))
    with pytest.raises(UsageError) as err:
        build_model(spec)
    message = str(err.value)
    assert not isinstance(err.value, backbones.PretrainedWeightsMissing)
    assert "150x1750" in message and "16x32" in message
    assert "144 or 160" in message and "1728 or 1760" in message


def test_convnext_freezes_whole_stages(fake_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", fake_hub["home"])
    fractions = []
    for k in range(4):
        net = build_model(ModelSpec("convnext", num_classes=4, img_height=32, img_width=256,
                                    freeze=k))
        frozen = [not any(p.requires_grad for p in m.parameters()) for m in net.backbone.features]
        # features = [stem, stage1, down, stage2, down, stage3, down, stage4]
        assert frozen == [i < 2 * k for i in range(8)]
        fractions.append(model.trainable_parameter_fraction(net))
        if k == 2:
            net.train()
            stages = list(net.backbone.features)
            assert not any(m.training for stage in stages[:4] for m in stage.modules())
            assert all(m.training for stage in stages[4:] for m in stage.modules())
    assert fractions[0] == 1.0
    assert all(a > b for a, b in zip(fractions, fractions[1:]))


def test_vit_freezes_whole_blocks(fake_hub, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", fake_hub["home"])
    fractions = []
    for k in (0, 1, 6, 11):
        net = build_model(ModelSpec("vit", num_classes=4, img_height=32, img_width=128, freeze=k))
        vit = net.backbone
        blocks = [not any(p.requires_grad for p in b.parameters()) for b in vit.encoder.layers]
        assert blocks == [i < k for i in range(12)]
        embeddings = [vit.conv_proj.weight, vit.class_token, vit.encoder.pos_embedding]
        assert all(p.requires_grad != (k > 0) for p in embeddings)
        fractions.append(model.trainable_parameter_fraction(net))
    assert fractions[0] == 1.0
    assert all(a > b for a, b in zip(fractions, fractions[1:]))


def test_freezing_random_weights_is_refused():
    with pytest.raises(UsageError, match="random weights"):
        build_model(ModelSpec("vit", num_classes=2, img_height=32, img_width=128,
                              pretrained=False, freeze=3))
    with pytest.raises(UsageError, match="0 to 3"):
        build_model(ModelSpec("convnext", num_classes=2, img_height=32, img_width=256, freeze=4))


def test_the_search_suggests_freezing_within_what_each_model_allows():
    space = KIND.default_space(WriterOptions(models=("small", "convnext", "vit")))
    highs = {entry.when[0][1][0]: entry.distribution.high
             for entry in dict(space.params)["freeze"]}
    assert set(highs) == set(model.FREEZABLE_UNITS)
    for model_type, top in highs.items():
        assert 0 < top <= model.FREEZABLE_UNITS[model_type], model_type


def test_small_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    spec = ModelSpec("small", num_classes=4, embedding_dim=32, img_height=32, img_width=128,
                     dropout=0.0)
    net = build_model(spec).train()
    x, y = torch.rand(8, 1, 32, 128), torch.arange(8) % 4
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(net(x)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
