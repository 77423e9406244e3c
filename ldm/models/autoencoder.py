"""First-stage models that map images to the latent space the diffusion model works in.

`AutoencoderKL` (Stable Diffusion's VAE: Gaussian posterior, trained with a reconstruction + KL + GAN loss),
`VQModel` / `VQModelInterface` (vector-quantized latents) and `IdentityFirstStage` (no autoencoder).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.tiling import tiled_blocks
from ldm.util import instantiate_from_config


def _load_checkpoint(model: nn.Module, path: str, ignore_keys: Sequence[str]) -> None:
    from ldm.checkpoint import load_weights, read_state_dict

    sd, _meta = read_state_dict(path)
    load_weights(model, sd, ignore_keys=ignore_keys)


def _do_not_count_step(optimizer: Any) -> None:
    """Keep this manual `optimizer.step()` out of `trainer.global_step` for the current batch.

    Lightning 2.x counts every manual optimizer step as a global step (Lightning issue #17958), so two
    optimizers would advance it twice per batch. The original (Lightning 1.x) counted batches, and loss
    schedules such as the discriminator's `disc_start` are written in batches; the trainer re-installs these
    hooks before every batch.
    """
    optimizer._on_before_step = optimizer._on_after_step = lambda: None


class AutoencoderKL(pl.LightningModule):
    """Images [B, C, H, W] in [-1, 1] <-> latents [B, embed_dim, H/f, W/f] with a diagonal Gaussian posterior.

    Trains with manual optimization: one Adam for the autoencoder and, when the loss has a discriminator in
    use, a second one for it. `train_decoder_only` freezes the encoder (and `quant_conv`), so the latent space
    stays that of a diffusion model already trained on it while the decoder improves (as Stability's
    fine-tuned SD VAEs were made). The loss is called as
    `loss(inputs, reconstructions, posterior, optimizer_idx, global_step, last_layer=..., split=...)`
    and returns `(loss, log_dict)`.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        train_decoder_only: bool = False,
    ):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError(
                "AutoencoderKL needs ddconfig.double_z: true (the encoder predicts mean and logvar)"
            )
        self.automatic_optimization = False
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self.tiling: int | None = None  # tile side in latent pixels, see enable_tiling
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.train_decoder_only = train_decoder_only
        if train_decoder_only:
            self.encoder.requires_grad_(False)
            self.quant_conv.requires_grad_(False)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        _load_checkpoint(self, path, ignore_keys)

    def enable_tiling(self, tile: int | None = 64) -> None:
        """Encode and decode with the memory of `tile` x `tile` latents: every block of the encoder and decoder
        runs in windows holding at most as many values as the widest layer over a (tile * f)^2-pixel image
        (ldm.modules.tiling.tiled_blocks), with the same result as untiled. None turns tiling off."""
        self.tiling = tile

    def _tile_elements(self) -> int:
        factor = 2 ** (self.decoder.num_resolutions - 1)
        return (self.tiling * factor) ** 2 * self.decoder.ch

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images [B, C, H, W] -> posterior over latents [B, embed_dim, H/f, W/f]."""
        if self.tiling is None:
            return DiagonalGaussianDistribution(self._encode_moments(x))
        with tiled_blocks(self.encoder, self._tile_elements()):
            return DiagonalGaussianDistribution(self._encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, embed_dim, h, w] -> images [B, out_ch, h*f, w*f]."""
        if self.tiling is None:
            return self._decode(z)
        with tiled_blocks(self.decoder, self._tile_elements()):
            return self._decode(z)

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `input` through a posterior sample (or its mode); returns (reconstruction, posterior)."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        """`batch[k]`: images [B, H, W, C] (or [B, H, W]) -> contiguous float [B, C, H, W]."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format)

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def _trains_discriminator(self) -> bool:
        """Whether the loss has a discriminator whose output it uses (it then gets its own optimizer)."""
        discriminator = getattr(self.loss, "discriminator", None)
        return (
            isinstance(discriminator, nn.Module)
            and any(True for _ in discriminator.parameters())
            and getattr(self.loss, "discriminator_weight", 1.0) != 0
        )

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        if isinstance(self.loss, nn.Identity):
            raise ValueError(
                "AutoencoderKL has no training loss (lossconfig is torch.nn.Identity, an inference config): "
                "set lossconfig, e.g. ldm.modules.losses.LPIPSWithDiscriminator"
            )
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        step = self.global_step  # both losses of a batch see the same step, as in the original
        optimizers = self.optimizers()
        if not isinstance(optimizers, list):
            optimizers = [optimizers]
        self._optimize(optimizers[0], 0, inputs, reconstructions, posterior, step)
        if len(optimizers) > 1:
            _do_not_count_step(optimizers[1])
            self._optimize(optimizers[1], 1, inputs, reconstructions.detach(), posterior, step)

    def _optimize(
        self,
        optimizer: Any,
        optimizer_idx: int,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        step: int,
    ) -> None:
        """One update of the autoencoder (optimizer_idx 0) or the discriminator (1); the other gets no grads."""
        self.toggle_optimizer(optimizer)
        loss, log_dict = self.loss(
            inputs,
            reconstructions,
            posterior,
            optimizer_idx,
            step,
            last_layer=self.get_last_layer(),
            split="train",
        )
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.untoggle_optimizer(optimizer)
        name = "aeloss" if optimizer_idx == 0 else "discloss"
        self.log(name, loss, prog_bar=True, logger=True, on_step=True, on_epoch=True)
        self.log_dict(log_dict, prog_bar=False, logger=True, on_step=True, on_epoch=False)

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        for optimizer_idx in range(2 if self._trains_discriminator() else 1):
            _, log_dict = self.loss(
                inputs,
                reconstructions,
                posterior,
                optimizer_idx,
                self.global_step,
                last_layer=self.get_last_layer(),
                split="val",
            )
            self.log_dict(log_dict)

    def configure_optimizers(self) -> torch.optim.Optimizer | list[torch.optim.Optimizer]:
        lr = self.learning_rate
        autoencoder_params = [*self.decoder.parameters(), *self.post_quant_conv.parameters()]
        if not self.train_decoder_only:
            autoencoder_params += [*self.encoder.parameters(), *self.quant_conv.parameters()]
        opt_ae = torch.optim.Adam(autoencoder_params, lr=lr, betas=(0.5, 0.9))
        if not self._trains_discriminator():
            return opt_ae
        opt_disc = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, torch.Tensor], only_inputs: bool = False, **kwargs
    ) -> dict[str, torch.Tensor]:
        """Inputs, their reconstructions and decodings of N(0, I) latents, each [B, C, H, W]."""
        log = {}
        x = self.get_input(batch, self.image_key).to(self.device)
        if not only_inputs:
            xrec, posterior = self(x)
            if x.shape[1] > 3:
                x, xrec = self.to_rgb(x), self.to_rgb(xrec)
            log["samples"] = self.decode(torch.randn_like(posterior.mean))
            log["reconstructions"] = xrec
        log["inputs"] = x
        return log

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation maps [B, nlabels, H, W] -> RGB [B, 3, H, W] in [-1, 1] by a fixed random projection."""
        assert self.image_key == "segmentation"
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest codebook entry, with a straight-through gradient.

    Codebook `embedding.weight` [n_e, e_dim]. The loss is taming's "legacy" one:
    mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2).
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | None = None,
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        super().__init__()
        if remap is not None:
            raise ValueError("VectorQuantizer: codebook remapping is not supported, set remap: null")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.sane_index_shape = sane_index_shape
        self.legacy = legacy
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[None, None, torch.Tensor]]:
        """z [B, e_dim, H, W] -> (z_q [B, e_dim, H, W], loss, (None, None, indices [B*H*W], or [B, H, W]))."""
        b, c, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        distances = z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2.0 * z_flat @ codebook.t()
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(b, h, w, c).permute(0, 3, 1, 2)
        commitment = torch.mean((z_q.detach() - z) ** 2)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook_loss
        else:
            loss = self.beta * commitment + codebook_loss
        z_q = (z + (z_q - z).detach()).contiguous()
        if self.sane_index_shape:
            indices = indices.view(b, h, w)
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Sequence[int] | None) -> torch.Tensor:
        """Codebook vectors for `indices`; with `shape` (B, H, W, C) they come back as [B, C, H, W]."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q


class VQModel(pl.LightningModule):
    """Images [B, C, H, W] <-> quantized latents [B, embed_dim, H/f, W/f] over a codebook of n_embed entries."""

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        remap: str | None = None,
        sane_index_shape: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(
            n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape
        )
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        _load_checkpoint(self, path, ignore_keys)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> unquantized latents [B, embed_dim, H/f, W/f]."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Images -> (quantized latents, codebook loss, (None, None, indices))."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Latents [B, embed_dim, h, w] -> images [B, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, input: torch.Tensor, return_pred_indices: bool = False) -> tuple[torch.Tensor, ...]:
        """Returns (reconstruction, codebook loss), plus the code indices when `return_pred_indices`."""
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight


class VQModelInterface(VQModel):
    """A VQModel whose `encode` stops before quantization and whose `decode` quantizes (the LDM interface)."""

    def __init__(self, embed_dim: int, *args, **kwargs):
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> unquantized latents [B, embed_dim, H/f, W/f]."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Latents [B, embed_dim, h, w] (quantized first unless `force_not_quantize`) -> images."""
        return super().decode(h if force_not_quantize else self.quantize(h)[0])


class IdentityFirstStage(nn.Module):
    """No first stage: the diffusion model works on pixels. Every method passes its input through."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x
