"""The batched augmentation (augment.py): the code a GPU run uses, exercised here on CPU tensors."""
import numpy as np
import pytest
import torch
from PIL import Image

from psearch.writer_id import augment as aug

STEPS = ("P_BINARIZE", "P_ROTATE", "P_BLUR", "P_JITTER", "P_NOISE")


def lines(n: int = 8, height: int = 32, width: int = 160) -> torch.Tensor:
    """uint8 [n, 1, H, W] lines: grey paper of varying tone with dark strokes."""
    rng = np.random.default_rng(0)
    out = np.empty((n, 1, height, width), dtype=np.uint8)
    for k in range(n):
        img = np.full((height, width), 200 + 6 * (k % 8), dtype=np.uint8)
        img[height // 3: 2 * height // 3, 10:width - 10:7] = rng.integers(20, 60)
        out[k, 0] = img
    return torch.from_numpy(out)


def run(batch: torch.Tensor, seed: int = 0, epoch: int = 0, **kw) -> torch.Tensor:
    return aug.augment_batch(batch, aug.epoch_generator(seed, epoch, batch.device), **kw)


def test_reproducible_under_a_seed_and_different_across_seeds_and_epochs():
    batch = lines()
    before = batch.clone()
    out = run(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, run(batch))
    assert not torch.equal(out, run(batch, seed=1)) and not torch.equal(out, run(batch, epoch=1))
    assert not torch.equal(out, aug.to_unit(batch))               # not the identity
    assert torch.equal(batch, before)                             # the input is not modified
    # each line gets its own draws: identical lines come out differently
    same = batch[:1].repeat(8, 1, 1, 1)
    assert len({run(same)[k].numpy().tobytes() for k in range(8)}) == 8


def test_without_any_step_it_only_scales(monkeypatch):
    for name in STEPS:
        monkeypatch.setattr(aug, name, 0.0)
    batch = lines()
    assert torch.equal(run(batch), batch.float() / 255)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_the_gpu_way_gives_the_same_lines_as_the_cpu_way(monkeypatch, noise):
    # sync_free (every step on every line, kept where drawn) is what a GPU runs; here on the CPU
    monkeypatch.setattr(aug, "P_NOISE", noise)
    batch = lines(16)
    torch.testing.assert_close(run(batch, sync_free=True), run(batch, sync_free=False),
                               atol=1e-6, rtol=0)


def only(monkeypatch, step: str) -> None:
    for name in STEPS:
        monkeypatch.setattr(aug, name, 1.0 if name == step else 0.0)


def test_binarisation_uses_otsu_per_line(monkeypatch):
    rng = np.random.default_rng(0)
    two_modes = np.concatenate([rng.normal(40, 8, 500), rng.normal(200, 10, 1500)])
    img = torch.from_numpy(np.clip(two_modes, 0, 255).astype(np.uint8).reshape(1, 1, 20, 100))
    assert 60 < int(aug.otsu_thresholds(img)[0]) < 170
    only(monkeypatch, "P_BINARIZE")
    out = run(lines())
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert ((out == 0).float().mean((1, 2, 3)) < 0.5).all()       # the strokes, not the paper


def test_rotation_matches_pil_and_fills_corners_with_paper(monkeypatch):
    rng = np.random.default_rng(3)
    img = np.full((32, 160), 230, np.uint8)
    img[8:24, 10:150] = rng.integers(0, 120, (16, 140))
    rotated = aug._rotate(torch.from_numpy(img).float()[None, None], torch.tensor([1.5]))
    pil = np.asarray(Image.fromarray(img).rotate(1.5, resample=Image.Resampling.BILINEAR,
                                                 fillcolor=255), dtype=np.float32)
    assert np.abs(rotated[0, 0].numpy() - pil).mean() < 2.0      # grey levels of 0..255
    only(monkeypatch, "P_ROTATE")
    black = torch.zeros(4, 1, 32, 160, dtype=torch.uint8)
    out = run(black)
    assert (out[:, :, 0, 0] > 0.9).any() or (out[:, :, 0, -1] > 0.9).any()
    assert (out[:, :, 16, 80] == 0).all()                         # the centre stays


def test_blur_jitter_and_noise_each_change_the_lines(monkeypatch):
    batch = lines()
    for step, check in (("P_BLUR", lambda o: o.std() < batch.float().div(255).std()),
                        ("P_JITTER", lambda o: not torch.allclose(o.mean((1, 2, 3)),
                                                                  batch.float().div(255).mean(
                                                                      (1, 2, 3)))),
                        ("P_NOISE", lambda o: (o - batch.float() / 255).abs().mean() > 0.005)):
        only(monkeypatch, step)
        out = run(batch)
        assert out.min() >= 0.0 and out.max() <= 1.0, step
        assert check(out), step


def test_refuses_what_is_not_a_uint8_batch_of_lines():
    with pytest.raises(ValueError, match="uint8"):
        run(lines().float())
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        run(lines()[:, 0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_reproducible_and_in_range():
    batch = lines(16).cuda()
    out = run(batch)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert torch.equal(out, run(batch)) and 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.equal(out, aug.to_unit(batch))
