"""First-stage models: checkpoint layout, numerics against diffusers, the posterior, training, VQ and identity."""

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from ldm.models.autoencoder import (
    AutoencoderKL,
    IdentityFirstStage,
    VectorQuantizer,
    VQModel,
    VQModelInterface,
)
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = {"target": "torch.nn.Identity"}


def sd_first_stage_params():
    config = OmegaConf.load(ROOT / "configs/stable-diffusion/v1-inference.yaml")
    return config.model.params.first_stage_config.params


def small_ddconfig(**overrides):
    """An f=8 autoencoder config, 32 channels wide."""
    ddconfig = dict(
        double_z=True,
        z_channels=4,
        resolution=64,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=[1, 2, 2, 4],
        num_res_blocks=2,
        attn_resolutions=[],
        dropout=0.0,
    )
    ddconfig.update(overrides)
    return ddconfig


# Checkpoint layout


def test_state_dict_matches_sd_v1_manifest():
    with torch.device("meta"):
        model = AutoencoderKL(**sd_first_stage_params())
    manifest = json.loads((ROOT / "tests/data/sd-v1-state-dict-manifest.json").read_text())
    expected = {
        entry["key"].removeprefix("first_stage_model."): tuple(entry["shape"])
        for entry in manifest["keys"]
        if entry["key"].startswith("first_stage_model.")
    }
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == expected
    assert len(ours) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863


def test_attention_variants_build_with_original_keys():
    encoder = Encoder(**small_ddconfig(ch_mult=[1, 2], resolution=16, attn_resolutions=[8]))
    keys = encoder.state_dict().keys()
    assert {"down.1.attn.0.q.weight", "down.1.attn.1.proj_out.bias", "mid.attn_1.norm.weight"} <= set(keys)
    assert not any(key.startswith("down.0.attn") for key in keys)

    decoder = Decoder(**small_ddconfig(ch_mult=[1, 2], resolution=16, attn_type="linear"))
    assert decoder.mid.attn_1.to_qkv.weight.shape == (192, 64, 1, 1)
    assert decoder(torch.randn(1, 4, 8, 8)).shape == (1, 3, 16, 16)
    assert Decoder(**small_ddconfig(attn_type="none")).mid.attn_1.__class__ is nn.Identity
    with pytest.raises(ValueError, match="attn_type"):
        Encoder(**small_ddconfig(attn_type="flash"))


# Numerics against diffusers


def randomize_(model: nn.Module, seed: int) -> None:
    """Non-trivial random weights: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05), norm scales ~ N(1, 0.1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def diffusers_twin(model: AutoencoderKL, block_out_channels: tuple[int, ...]) -> nn.Module:
    """diffusers' AutoencoderKL holding `model`'s weights, converted by diffusers' own single-file helper."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    twin = DiffusersAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    )
    converted = convert_ldm_vae_checkpoint(model.state_dict(), twin.config)
    twin.load_state_dict(converted, strict=True)
    return twin.eval()


def max_diffs_vs_diffusers(model: AutoencoderKL, block_out_channels, image_shape, latent_shape):
    twin = diffusers_twin(model, block_out_channels)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(image_shape, generator=generator)
    z = torch.randn(latent_shape, generator=generator)
    with torch.no_grad():
        posterior = model.encode(x)
        reference = twin.encode(x).latent_dist
        decoded = model.decode(z)
        reference_decoded = twin.decode(z).sample
    assert posterior.parameters.shape == reference.parameters.shape
    assert decoded.shape == reference_decoded.shape
    # the comparison is only meaningful if the outputs are O(1) and not constant
    assert 0.1 < posterior.mean.std() < 100 and 0.1 < decoded.std() < 100
    return (posterior.parameters - reference.parameters).abs().max().item(), (
        decoded - reference_decoded
    ).abs().max().item()


def test_matches_diffusers_at_sd_v1_width():
    model = AutoencoderKL(**sd_first_stage_params()).eval()
    randomize_(model, seed=0)
    moments_diff, decode_diff = max_diffs_vs_diffusers(
        model, (128, 256, 512, 512), (1, 3, 64, 64), (1, 4, 8, 8)
    )
    assert moments_diff <= 1e-4
    assert decode_diff <= 1e-4


def test_matches_diffusers_small():
    model = AutoencoderKL(ddconfig=small_ddconfig(), lossconfig=IDENTITY, embed_dim=4).eval()
    randomize_(model, seed=0)
    moments_diff, decode_diff = max_diffs_vs_diffusers(model, (32, 64, 64, 128), (2, 3, 32, 48), (2, 4, 4, 6))
    assert moments_diff <= 1e-4
    assert decode_diff <= 1e-4


# The posterior


def test_diagonal_gaussian_mode_clamp_and_sample():
    mean = torch.randn(2, 4, 3, 3)
    logvar = torch.randn(2, 4, 3, 3)
    logvar[0, 0, 0, 0] = 50.0
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    assert torch.equal(posterior.mode(), mean)
    assert posterior.logvar[0, 0, 0, 0] == 20.0
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * logvar.clamp(-30, 20)))

    first = posterior.sample(torch.Generator().manual_seed(3))
    again = posterior.sample(torch.Generator().manual_seed(3))
    other = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first, mean + posterior.std * noise)

    point = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert torch.equal(point.sample(), mean)
    assert point.kl().sum() == 0


def test_diagonal_gaussian_kl_and_nll():
    p = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    q = DiagonalGaussianDistribution(torch.randn(2, 8, 3, 3))
    by_hand = 0.5 * (p.mean**2 + torch.exp(p.logvar) - 1.0 - p.logvar).sum(dim=[1, 2, 3])
    torch.testing.assert_close(p.kl(), by_hand)

    def normal(d):
        return torch.distributions.Normal(d.mean, torch.exp(0.5 * d.logvar))

    expected = torch.distributions.kl_divergence(normal(p), normal(q)).sum(dim=[1, 2, 3])
    torch.testing.assert_close(p.kl(q), expected)
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(p.nll(x), -normal(p).log_prob(x).sum(dim=[1, 2, 3]))
    torch.testing.assert_close(p.nll(x, dims=[1]), -normal(p).log_prob(x).sum(dim=1))


def test_normal_kl():
    mean1, logvar1, mean2, logvar2 = torch.randn(4, 5).unbind(0)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, torch.exp(0.5 * logvar1)),
        torch.distributions.Normal(mean2, torch.exp(0.5 * logvar2)),
    )
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean2, logvar2), expected)
    standard = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean1, torch.exp(0.5 * logvar1)), standard
    )
    torch.testing.assert_close(normal_kl(mean1, logvar1, 0.0, 0.0), expected)


# Training


class L1KLLoss(nn.Module):
    """L1 reconstruction + KL, plus (optionally) a tiny hinge-loss discriminator; records each call's step."""

    def __init__(self, with_discriminator: bool, kl_weight: float = 1e-6):
        super().__init__()
        self.kl_weight = kl_weight
        if with_discriminator:
            self.discriminator = nn.Sequential(
                nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, 1, 1)
            )
            self.discriminator_weight = 0.01
        self.calls: list[tuple[int, int, str]] = []

    def forward(
        self, inputs, reconstructions, posterior, optimizer_idx, global_step, last_layer=None, split="train"
    ):
        self.calls.append((optimizer_idx, global_step, split))
        if optimizer_idx == 0:
            rec_loss = (inputs - reconstructions).abs().mean()
            kl_loss = posterior.kl().mean()
            loss = rec_loss + self.kl_weight * kl_loss
            if hasattr(self, "discriminator"):
                loss = loss - self.discriminator_weight * self.discriminator(reconstructions).mean()
            return loss, {f"{split}/rec_loss": rec_loss.detach(), f"{split}/kl_loss": kl_loss.detach()}
        logits_real = self.discriminator(inputs)
        logits_fake = self.discriminator(reconstructions)
        d_loss = 0.5 * (torch.relu(1.0 - logits_real).mean() + torch.relu(1.0 + logits_fake).mean())
        return d_loss, {f"{split}/disc_loss": d_loss.detach()}


def tiny_autoencoder(with_discriminator: bool) -> AutoencoderKL:
    ddconfig = small_ddconfig(resolution=16, ch_mult=[1, 2], num_res_blocks=1)
    model = AutoencoderKL(ddconfig=ddconfig, lossconfig=IDENTITY, embed_dim=4)
    model.loss = L1KLLoss(with_discriminator)
    model.learning_rate = 2e-3
    return model


def image_batches() -> DataLoader:
    """Four smooth 16x16 RGB images in [-1, 1], HWC, in batches of two."""
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(4, 3, 4, 4, generator=generator) * 2 - 1
    images = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    return DataLoader([{"image": image} for image in images.permute(0, 2, 3, 1)], batch_size=2)


def reconstruction_error(model: AutoencoderKL, batches) -> float:
    with torch.no_grad():
        x = torch.cat([model.get_input(batch, "image") for batch in batches])
        return (model(x, sample_posterior=False)[0] - x).abs().mean().item()


def quiet_trainer(max_steps: int) -> pl.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or summary."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.fixture
def one_thread():
    """Tiny tensors train faster on one thread, and much faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("with_discriminator", [False, True])
def test_training_reduces_reconstruction_loss(with_discriminator, one_thread):
    torch.manual_seed(0)
    model = tiny_autoencoder(with_discriminator)
    batches = image_batches()
    before = reconstruction_error(model, batches)
    discriminator_before = [p.detach().clone() for p in model.loss.parameters()]
    steps = 30
    trainer = quiet_trainer(steps)
    trainer.fit(model, train_dataloaders=batches)
    after = reconstruction_error(model, batches)
    assert after < 0.7 * before, (before, after)

    # one global step per batch, and both losses of a batch see the same step
    assert trainer.global_step == steps
    assert len(trainer.optimizers) == (2 if with_discriminator else 1)
    train_calls = [call for call in model.loss.calls if call[2] == "train"]
    expected = [(idx, step, "train") for step in range(steps) for idx in range(len(trainer.optimizers))]
    assert train_calls == expected
    weights = [
        (p, q) for p, q in zip(model.loss.parameters(), discriminator_before, strict=True) if p.ndim > 1
    ]
    assert len(weights) == (2 if with_discriminator else 0)
    assert all(not torch.equal(p, q) for p, q in weights)

    metrics = trainer.validate(model, dataloaders=batches, verbose=False)[0]
    assert "val/rec_loss" in metrics
    assert ("val/disc_loss" in metrics) == with_discriminator


def test_train_decoder_only_keeps_the_latent_space(one_thread):
    torch.manual_seed(0)
    model = tiny_autoencoder(with_discriminator=False)
    frozen = AutoencoderKL(
        ddconfig=small_ddconfig(resolution=16, ch_mult=[1, 2], num_res_blocks=1),
        lossconfig=IDENTITY,
        embed_dim=4,
        train_decoder_only=True,
    )
    frozen.load_state_dict(model.state_dict())
    frozen.loss, frozen.learning_rate = model.loss, model.learning_rate
    batches = image_batches()
    x = torch.cat([frozen.get_input(batch, "image") for batch in batches])
    with torch.no_grad():
        latents_before = frozen.encode(x).mean
    before = reconstruction_error(frozen, batches)
    trainer = quiet_trainer(20)
    trainer.fit(frozen, train_dataloaders=batches)

    with torch.no_grad():
        assert torch.equal(frozen.encode(x).mean, latents_before)
    assert reconstruction_error(frozen, batches) < 0.8 * before
    decoders = zip(frozen.decoder.parameters(), model.decoder.parameters(), strict=True)
    assert any(not torch.equal(p, q) for p, q in decoders)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in frozen.encoder.parameters()}


def test_training_with_inference_config_is_a_clear_error():
    model = AutoencoderKL(
        ddconfig=small_ddconfig(resolution=16, ch_mult=[1, 2]), lossconfig=IDENTITY, embed_dim=4
    )
    with pytest.raises(ValueError, match="lossconfig"):
        model.training_step(next(iter(image_batches())), 0)
    model.learning_rate = 1e-4
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)


def test_get_input_and_log_images():
    model = tiny_autoencoder(with_discriminator=False)
    batch = next(iter(image_batches()))
    x = model.get_input(batch, "image")
    assert x.shape == (2, 3, 16, 16) and x.is_contiguous() and x.dtype == torch.float32
    assert torch.equal(x[1, 2], batch["image"][1, :, :, 2])
    log = model.log_images(batch)
    assert {key: tuple(value.shape) for key, value in log.items()} == {
        "inputs": (2, 3, 16, 16),
        "reconstructions": (2, 3, 16, 16),
        "samples": (2, 3, 16, 16),
    }
    assert set(model.log_images(batch, only_inputs=True)) == {"inputs"}


# VQ and identity first stages


VQ_DDCONFIG = small_ddconfig(double_z=False, z_channels=3, resolution=16, ch_mult=[1, 2, 4], num_res_blocks=1)


def test_vector_quantizer_picks_nearest_code_with_straight_through_gradient():
    quantizer = VectorQuantizer(16, 3, beta=0.25)
    nn.init.normal_(quantizer.embedding.weight)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    z_q, loss, (_, _, indices) = quantizer(z)
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    expected = torch.cdist(flat, quantizer.embedding.weight.detach()).argmin(dim=1)
    assert torch.equal(indices, expected)
    codes = quantizer.embedding.weight[expected].detach().view(2, 4, 5, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, codes)
    torch.testing.assert_close(loss, 1.25 * ((codes - z.detach()) ** 2).mean())
    z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    torch.testing.assert_close(quantizer.get_codebook_entry(indices, (2, 4, 5, 3)), codes)
    with pytest.raises(ValueError, match="remap"):
        VectorQuantizer(16, 3, beta=0.25, remap="codes.npy")


def test_vq_model_encode_decode_shapes():
    model = instantiate_from_config(
        {
            "target": "ldm.models.autoencoder.VQModel",
            "params": {"embed_dim": 3, "n_embed": 16, "ddconfig": VQ_DDCONFIG, "lossconfig": IDENTITY},
        }
    )
    assert model.quantize.embedding.weight.shape == (16, 3)
    assert {"quant_conv.weight", "post_quant_conv.weight", "quantize.embedding.weight"} <= set(
        model.state_dict()
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        quant, diff, (_, _, indices) = model.encode(x)
        assert quant.shape == (2, 3, 4, 4) and indices.shape == (32,) and diff.ndim == 0
        codebook = model.quantize.embedding.weight
        torch.testing.assert_close(quant, codebook[indices].view(2, 4, 4, 3).permute(0, 3, 1, 2))
        assert model.decode(quant).shape == (2, 3, 16, 16)
        dec, _, ind = model(x, return_pred_indices=True)
        assert dec.shape == (2, 3, 16, 16) and torch.equal(ind, indices)


def test_vq_model_interface_and_identity():
    params = {
        "embed_dim": 3,
        "n_embed": 16,
        "ddconfig": VQ_DDCONFIG,
        "lossconfig": IDENTITY,
        "sane_index_shape": True,
    }
    model = instantiate_from_config({"target": "ldm.models.autoencoder.VQModelInterface", "params": params})
    assert isinstance(model, VQModelInterface)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        h = model.encode(x)
        assert h.shape == (1, 3, 4, 4)
        quant, _, (_, _, indices) = model.quantize(h)
        assert indices.shape == (1, 4, 4)
        torch.testing.assert_close(model.decode(h), VQModel.decode(model, quant))
        assert model.decode(h, force_not_quantize=True).shape == (1, 3, 16, 16)
        assert not torch.equal(model.decode(h, force_not_quantize=True), model.decode(h))

    identity = instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage"})
    assert (
        identity.encode(x) is x and identity.decode(x) is x and identity(x) is x and identity.quantize(x) is x
    )
    quant, loss, info = IdentityFirstStage(vq_interface=True).quantize(x)
    assert quant is x and loss is None and info == [None, None, None]
