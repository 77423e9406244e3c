"""LR schedules, the EMA, and the autoencoder loss (GAN parts, LPIPS loading) against hand computations."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.losses import LPIPSWithDiscriminator, contperceptual
from ldm.modules.losses import lpips as lpips_module
from ldm.modules.losses.lpips import LPIPS
from ldm.modules.losses.vqperceptual import (
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.training import ModelCheckpoint

# ---------------------------------------------------------------------------------------------- schedules


def test_warmup_cosine_values():
    s = LambdaWarmUpCosineScheduler(
        warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110
    )
    assert s(0) == pytest.approx(0.0)
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55)  # halfway through the cosine: 0.1 + 0.45 * (1 + cos(pi/2))
    assert s(110) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)
    assert s.last_lr == pytest.approx(0.1)


def test_warmup_cosine2_cycles():
    s = LambdaWarmUpCosineScheduler2(
        warm_up_steps=[2, 0], f_min=[0.1, 0.0], f_max=[1.0, 0.5], f_start=[0.0, 0.5], cycle_lengths=[10, 20]
    )
    assert s(1) == pytest.approx(0.5)
    assert s(6) == pytest.approx(0.55)
    assert s(10) == pytest.approx(0.1)  # step 10 still belongs to the first cycle
    assert s(11) == pytest.approx(0.25 * (1 + math.cos(math.pi / 20)))
    assert s(30) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="past the last cycle"):
        s(31)
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaWarmUpCosineScheduler2([1], [0.0], [1.0], [0.0], [10, 20])


def test_linear_scheduler_v1_config_and_lambdalr():
    # configs/stable-diffusion/v1-*.yaml
    s = LambdaLinearScheduler(
        warm_up_steps=[10000], cycle_lengths=[10000000000000], f_start=[1.0e-6], f_max=[1.0], f_min=[1.0]
    )
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx(0.5000005)
    assert s(10000) == pytest.approx(1.0)
    assert s(10**9) == pytest.approx(1.0)

    s = LambdaLinearScheduler(warm_up_steps=[2], cycle_lengths=[10], f_start=[0.0], f_max=[1.0], f_min=[0.0])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s.schedule)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # warm-up 0, 0.5, then 2 * (10 - n) / 10
    assert lrs == pytest.approx([0.0, 1.0, 1.6, 1.4, 1.2, 1.0, 0.8])


# -------------------------------------------------------------------------------------------------- EMA


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].bias.requires_grad_(False)
    return model


def test_ema_buffers_and_update_math():
    model = _toy_model()
    ema = LitEma(model)
    assert set(ema.state_dict()) == {"decay", "num_updates", "0weight", "0bias", "1weight"}
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32

    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    d1 = 2 / 11  # min(0.9999, (1 + 1) / (10 + 1))
    expected = start - (1 - d1) * (start - model[0].weight.detach())
    torch.testing.assert_close(ema.get_buffer("0weight"), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema(model)
    d2 = 3 / 12
    expected = expected - (1 - d2) * (expected - model[0].weight.detach())
    torch.testing.assert_close(ema.get_buffer("0weight"), expected, rtol=0, atol=1e-6)
    assert int(ema.num_updates) == 2

    # Resuming restores the EMA exactly.
    resumed = LitEma(_toy_model())
    resumed.load_state_dict(ema.state_dict())
    for name, buf in ema.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], buf, rtol=0, atol=0)


def test_ema_fixed_decay():
    model = _toy_model()
    ema = LitEma(model, decay=0.9, use_num_upates=False)
    start = model[0].bias.detach().clone()
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    ema(model)
    torch.testing.assert_close(ema.get_buffer("0bias"), 0.9 * start + 0.1, rtol=0, atol=1e-6)
    assert int(ema.num_updates) == -1
    with pytest.raises(ValueError, match="between 0 and 1"):
        LitEma(model, decay=1.5)


def test_ema_store_copy_restore_round_trip():
    model = _toy_model()
    ema = LitEma(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    ema(model)
    trained = [p.detach().clone() for p in model.parameters()]

    ema.store(model.parameters())
    ema.copy_to(model)
    torch.testing.assert_close(model[0].weight.detach(), ema.get_buffer("0weight"), rtol=0, atol=0)
    assert not torch.equal(model[0].weight, trained[0])
    torch.testing.assert_close(model[1].bias.detach(), trained[3], rtol=0, atol=0)  # frozen: untouched
    ema.restore(model.parameters())
    for p, t in zip(model.parameters(), trained, strict=True):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- GAN


def test_discriminator_losses_and_adopt_weight():
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # hinge: real relu(1 - r) = [0, 0.5], fake relu(1 + f) = [0, 1.5]
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.25 + 0.75))
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected = 0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-2.0) + sp(0.5)) / 2)
    assert float(vanilla_d_loss(real, fake)) == pytest.approx(expected)
    assert adopt_weight(1.0, 5, threshold=10) == 0.0
    assert adopt_weight(1.0, 10, threshold=10) == 1.0


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, ndf=64, n_layers=3)
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    shapes = {k: tuple(v.shape) for k, v in loss.discriminator.state_dict().items()}
    assert shapes["main.0.weight"] == (64, 3, 4, 4) and shapes["main.0.bias"] == (64,)
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in shapes
    assert shapes["main.3.running_mean"] == (128,)
    assert shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4) and shapes["main.11.bias"] == (1,)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    # 64 -> 32 -> 16 -> 8 (stride 2), then two stride-1 4x4 convs: 7, 6
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    w = torch.cat([loss.discriminator.main[i].weight.detach().flatten() for i in (0, 2, 5, 8)])
    assert float(w.std()) == pytest.approx(0.02, rel=0.05)
    assert float(loss.discriminator.main[3].weight.detach().mean()) == pytest.approx(1.0, abs=0.01)
    assert float(loss.discriminator.main[3].bias.detach().abs().max()) == 0.0


def test_actnorm_discriminator_initialises_from_first_batch():
    torch.manual_seed(0)
    d = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=2, use_actnorm=True)
    assert "main.3.loc" in d.state_dict() and "main.2.bias" in d.state_dict()
    x = torch.randn(4, 3, 32, 32)
    h = d.main[:4](x)  # conv, leaky relu, conv, actnorm
    assert int(d.main[3].initialized) == 1
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(16), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.std(dim=(0, 2, 3)), torch.ones(16), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ KL AE loss


def _posterior(batch: int = 2) -> DiagonalGaussianDistribution:
    g = torch.Generator().manual_seed(1)
    return DiagonalGaussianDistribution(torch.randn(batch, 8, 4, 4, generator=g))


def test_no_perceptual_weight_builds_no_lpips(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("LPIPS must not be built with perceptual_weight 0")

    monkeypatch.setattr(contperceptual, "LPIPS", forbidden)
    loss = LPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0)
    assert not hasattr(loss, "perceptual_loss")
    assert not any(k.startswith("perceptual_loss.") for k in loss.state_dict())
    assert "logvar" in dict(loss.named_parameters())


def test_identical_inputs_leave_only_kl():
    loss_fn = LPIPSWithDiscriminator(disc_start=10, kl_weight=1e-6, perceptual_weight=0.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = _posterior()
    with torch.no_grad():
        loss, log = loss_fn(x, x.clone(), post, 0, global_step=0, split="val")
    kl = post.kl().sum() / 2
    assert float(log["val/rec_loss"]) == 0.0
    assert float(log["val/nll_loss"]) == 0.0  # logvar 0
    assert float(log["val/kl_loss"]) == pytest.approx(float(kl))
    assert float(log["val/disc_factor"]) == 0.0  # before disc_start
    assert float(loss) == pytest.approx(1e-6 * float(kl))


def test_nll_with_logvar_and_weights():
    loss_fn = LPIPSWithDiscriminator(disc_start=10, logvar_init=0.5, kl_weight=0.0, perceptual_weight=0.0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    # per-element |x - y| / e^0.5 + 0.5, summed over elements, divided by the batch size
    nll = float((x - y).abs().sum() / 2 / math.exp(0.5) + 0.5 * 3 * 32 * 32)
    with torch.no_grad():
        loss, log = loss_fn(x, y, _posterior(), 0, global_step=0)
        loss2, log2 = loss_fn(x, y, _posterior(), 0, global_step=0, weights=2.0)
    assert float(log["train/nll_loss"]) == pytest.approx(nll, rel=1e-6)
    assert float(log["train/logvar"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(nll, rel=1e-6)
    assert float(loss2) == pytest.approx(2 * nll, rel=1e-6)
    assert float(log2["train/nll_loss"]) == pytest.approx(nll, rel=1e-6)


def test_adaptive_gan_weight_after_disc_start():
    torch.manual_seed(0)
    loss_fn = LPIPSWithDiscriminator(disc_start=5, kl_weight=1e-3, disc_weight=0.5, perceptual_weight=0.0)
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    z = torch.randn(2, 4, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = _posterior()
    rec = decoder(z)
    loss, log = loss_fn(x, rec, post, 0, global_step=5, last_layer=decoder.weight)

    # Reference: the same terms, with the weight computed by hand.
    nll = ((x - rec).abs()).sum() / 2
    g_loss = -loss_fn.discriminator(rec).mean()
    grad_nll = torch.autograd.grad(nll, decoder.weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g_loss, decoder.weight, retain_graph=True)[0]
    d_weight = 0.5 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    expected = nll + 1e-3 * post.kl().sum() / 2 + d_weight * g_loss
    assert float(log["train/d_weight"]) == pytest.approx(float(d_weight), rel=1e-4)
    assert float(d_weight) > 0
    assert float(log["train/disc_factor"]) == 1.0
    assert float(log["train/g_loss"]) == pytest.approx(float(g_loss.detach()), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    loss.backward()
    assert decoder.weight.grad is not None and loss_fn.logvar.grad is not None

    # Validation (eval, no graph): the GAN weight is 0 as in the original.
    loss_fn.eval()
    with torch.no_grad():
        loss, log = loss_fn(x, decoder(z), post, 0, global_step=5, last_layer=decoder.weight, split="val")
    assert float(log["val/d_weight"]) == 0.0
    assert float(loss) == pytest.approx(float(nll.detach() + 1e-3 * post.kl().sum() / 2), rel=1e-5)


def test_discriminator_pass():
    torch.manual_seed(0)
    loss_fn = LPIPSWithDiscriminator(disc_start=5, disc_factor=2.0, perceptual_weight=0.0).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    d_loss, log = loss_fn(x, rec, _posterior(), 1, global_step=4)
    assert float(d_loss.detach()) == 0.0  # disc_factor is 0 before disc_start
    d_loss, log = loss_fn(x, rec, _posterior(), 1, global_step=5)
    expected = 2.0 * hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(rec.detach()))
    assert float(d_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(log["train/logits_real"]) == pytest.approx(
        float(loss_fn.discriminator(x).detach().mean()), rel=1e-6
    )
    d_loss.backward()
    assert rec.grad is None  # reconstructions are detached for the discriminator
    assert loss_fn.discriminator.main[0].weight.grad is not None
    with pytest.raises(ValueError, match="optimizer_idx"):
        loss_fn(x, rec, _posterior(), 2, global_step=5)
    with pytest.raises(ValueError, match="disc_loss"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_loss="wgan")


# ----------------------------------------------------------------------------------------------- LPIPS


def test_missing_lpips_weights_give_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        LPIPSWithDiscriminator(disc_start=0)
    message = str(info.value)
    assert "\n" not in message
    assert "VGG16 ImageNet weights" in message and str(tmp_path) in message
    assert "perceptual_weight: 0.0" in message
    with pytest.raises(FileNotFoundError, match="LPIPS linear weights"):
        LPIPS(vgg_path=tmp_path / "nope.pth", lin_path=tmp_path / "nope_lin.pth")


@pytest.fixture(scope="module")
def fake_lpips_files(tmp_path_factory):
    """Random VGG16 features (torchvision's layout) and linear weights, saved like the real files."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        features = torchvision.models.vgg16(weights=None).features
    features = features.to_empty(device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in features.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5)
    root = tmp_path_factory.mktemp("torch_home")
    vgg_file = root / "hub" / "checkpoints" / "vgg16-397923af.pth"
    vgg_file.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, vgg_file)
    lins = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for k, c in enumerate(lpips_module.CHANNELS)
    }
    lin_file = root / "vgg.pth"
    torch.save(lins, lin_file)
    return root, lin_file, features, lins


@pytest.fixture
def fake_lpips_weights(monkeypatch, fake_lpips_files):
    """Point the real look-ups at the fake files: the torch hub cache (TORCH_HOME) for torchvision's VGG16
    weights and the lpips package's linear-layer file."""
    root, lin_file, features, lins = fake_lpips_files
    monkeypatch.setenv("TORCH_HOME", str(root))
    assert lpips_module.vgg16_weights_path() == root / "hub" / "checkpoints" / "vgg16-397923af.pth"
    monkeypatch.setattr(lpips_module, "lpips_lin_weights_path", lambda: lin_file)
    return features, lins


def test_lpips_loads_and_matches_reference(fake_lpips_weights):
    features, lins = fake_lpips_weights
    model = LPIPS().eval()
    keys = set(model.state_dict())
    assert {"scaling_layer.shift", "net.slice1.0.weight", "net.slice2.5.weight", "net.slice5.28.bias"} <= keys
    assert {f"lin{k}.model.1.weight" for k in range(5)} <= keys
    assert not any(p.requires_grad for p in model.parameters())

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        d = model(x, y)
        shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        h0, h1, expected = (x - shift) / scale, (y - shift) / scale, 0.0
        for k, end in enumerate([4, 9, 16, 23, 30]):
            start = [0, 4, 9, 16, 23][k]
            h0, h1 = features[start:end](h0), features[start:end](h1)
            n0 = h0 / (h0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            n1 = h1 / (h1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            expected = expected + F.conv2d((n0 - n1) ** 2, lins[f"lin{k}.model.1.weight"]).mean(
                [2, 3], keepdim=True
            )
        assert d.shape == (2, 1, 1, 1) and float(d.min()) > 0
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-6)
        assert float(model(x, x).abs().max()) == 0.0
        torch.testing.assert_close(model(y, x), d, rtol=1e-5, atol=1e-6)


def test_loss_with_lpips(fake_lpips_weights):
    loss_fn = LPIPSWithDiscriminator(disc_start=10, kl_weight=0.0, perceptual_weight=0.5).eval()
    assert any(k.startswith("perceptual_loss.net.slice1.") for k in loss_fn.state_dict())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        loss, log = loss_fn(x, y, _posterior(1), 0, global_step=0)
        p = loss_fn.perceptual_loss(x, y)
    expected_rec = ((x - y).abs() + 0.5 * p).mean()
    assert float(log["train/rec_loss"]) == pytest.approx(float(expected_rec), rel=1e-5)


class _ConstantValidationLoss(pl.LightningModule):
    """A one-weight model whose validation metric never improves after the first validation."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_checkpoint_follows_training_when_the_metric_stops_improving(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/loss", save_top_k=1, save_last=True)
    data = torch.utils.data.DataLoader(torch.ones(64, 1), batch_size=4)
    trainer = pl.Trainer(
        max_steps=6,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[checkpoint],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_ConstantValidationLoss(), data, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch=0-step=2.ckpt",
        "last.ckpt",
    ]  # best: the first
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 6


def test_progress_bar_total_holds_after_a_resume_mid_epoch():
    """Resumed 4 batches into a 16-batch epoch at global step 20 with max_steps 30: 14 batches to show (Lightning's
    own bar said 10 and counted past it, "14/9"); a bounded max_epochs is left to Lightning's count."""
    from types import SimpleNamespace

    from ldm.training import ProgressBar

    progress = SimpleNamespace(current=SimpleNamespace(ready=4))
    trainer = SimpleNamespace(
        max_epochs=-1, max_steps=30, global_step=20, num_training_batches=16,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )  # fmt: skip
    bar = ProgressBar()
    bar._trainer = trainer
    assert bar.total_train_batches == 14
    trainer.global_step, progress.current.ready = 16, 0  # a fresh epoch
    assert bar.total_train_batches == 14
    trainer.max_epochs = 3
    assert bar.total_train_batches == 16
