"""Denoising diffusion in pixel space (DDPM) and in an autoencoder's latent space (LatentDiffusion).

The file reads top to bottom: the noise schedule, the forward process and the training loss (DDPM), the
ancestral sampler used for logging, then the latent model that wraps a first stage (autoencoder) and a
condition stage (text encoder) around the same machinery. Fast samplers live in ddim.py, plms.py and
dpm_solver/.
"""

from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchvision.utils import make_grid
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule, noise_like
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import default, exists, instantiate_from_config, log_txt_as_img, mean_flat


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Stands in for `.train()` on frozen sub-models so a parent's `.train()` cannot switch them out of eval."""
    return self


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a noise-predicting (or x0-predicting) network, trained on `loss_simple`."""

    def __init__(
        self,
        unet_config: dict,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple = (),
        load_only_unet: bool = False,
        monitor: str = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: list[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: dict | None = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        ucg_training: dict | None = None,
    ):
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization '{parameterization}' unknown: use 'eps' or 'x0'")
        if use_positional_encodings:
            raise NotImplementedError("use_positional_encodings (bounding-box conditioning) is not supported")
        self.parameterization = parameterization
        print(f"{self.__class__.__name__}: Running in {self.parameterization}-prediction mode")
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.model = DiffusionWrapper(unet_config, conditioning_key)

        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
            print(f"Keeping EMAs of {len(list(self.model_ema.buffers()))}.")

        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config

        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        if monitor is not None:
            self.monitor = monitor
        # Each entry {batch_key: {"p": prob, "val": replacement}} drops that conditioning during training,
        # which is what makes classifier-free guidance work at sampling time.
        self.ucg_training = dict(ucg_training or {})

        self.register_schedule(
            given_betas=given_betas,
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
        )

        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), logvar_init, dtype=torch.float32, device="cpu")
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)

        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ----------------------------------------------------------------------------------------- schedule

    def register_schedule(
        self,
        given_betas: list[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Compute the schedule in float64 and store it as fp32 buffers [T].

        Buffers are created on the CPU explicitly so that a model built on the meta device still has them.
        """
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(
                beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
            )
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])

        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        if alphas_cumprod.shape[0] != self.num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")

        def buffer(name: str, values: np.ndarray, persistent: bool = True) -> None:
            self.register_buffer(
                name, torch.tensor(values, dtype=torch.float32, device="cpu"), persistent=persistent
            )

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        # q(x_t | x_0)
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        buffer("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod))
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))
        # q(x_{t-1} | x_t, x_0)
        posterior_variance = (1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
            1.0 - alphas_cumprod
        ) + self.v_posterior * betas
        buffer("posterior_variance", posterior_variance)
        # the variance is 0 at the start of the chain, so its log is clipped
        buffer("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

        if self.parameterization == "eps":
            with np.errstate(divide="ignore"):  # step 0 has zero posterior variance; it is replaced below
                lvlb_weights = betas**2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
        else:
            # the original's expression, kept for identical numbers: 2. * 1 - a reads as 2 - a
            lvlb_weights = 0.5 * np.sqrt(alphas_cumprod) / (2.0 * 1 - alphas_cumprod)
        lvlb_weights[0] = lvlb_weights[1]
        buffer("lvlb_weights", lvlb_weights, persistent=False)
        if torch.isnan(self.lvlb_weights).any():
            raise ValueError("the variational lower-bound weights are NaN for this schedule")

    @contextmanager
    def ema_scope(self, context: str | None = None):
        """Swap the EMA weights into the model for the duration of the block."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                print(f"{context}: Switched to EMA weights")
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    print(f"{context}: Restored training weights")

    def init_from_ckpt(
        self, path: str, ignore_keys: list[str] | tuple = (), only_model: bool = False
    ) -> None:
        """Load weights from a `.ckpt`/`.safetensors` file (strict=False, as the original)."""
        from ldm.checkpoint import load_weights, read_state_dict

        state_dict, _ = read_state_dict(path)
        if only_model:
            state_dict = {k[len("model.") :]: v for k, v in state_dict.items() if k.startswith("model.")}
            load_weights(self.model, state_dict, ignore_keys=ignore_keys)
            return
        missing, _ = load_weights(self, state_dict, ignore_keys=ignore_keys)
        if self.use_ema and any(k.startswith("model_ema.") for k in missing):
            # an EMA-only release checkpoint: its weights are the EMA, so the EMA starts from them
            print("The checkpoint has no EMA weights: the EMA starts from the loaded model weights.")
            self.model_ema = LitEma(self.model)
        print(f"Restored from {path}")

    # -------------------------------------------------------------------------------- forward process

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) for x_start [B, C, H, W] and integer timesteps t [B]."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        posterior_mean = (
            extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance

    # ----------------------------------------------------------------------------- network and loss

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The network's prediction (eps or x0) for x_noisy [B, C, H, W] at timesteps t [B]."""
        return self.model(x_noisy, t)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        if self.loss_type == "l2":
            return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")
        raise NotImplementedError(f"unknown loss type '{self.loss_type}': use l1 or l2")

    def p_losses(
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The training loss at timesteps t [B]: loss_simple (re-weighted by the learned log-variance) plus
        `original_elbo_weight` times the variational bound term."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start

        prefix = "train" if self.training else "val"
        per_sample = mean_flat(self.get_loss(model_output, target, mean=False))
        loss_dict = {f"{prefix}/loss_simple": per_sample.mean()}

        logvar_t = self.logvar[t]
        loss = per_sample / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()

        loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(self, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, None, t, *args, **kwargs)

    # ---------------------------------------------------------------------------- ancestral sampling

    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, cond: Any, clip_denoised: bool):
        model_out = self.apply_model(x, t, cond)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        else:
            x_recon = model_out
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        model_mean, posterior_variance, posterior_log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        return model_mean, posterior_variance, posterior_log_variance, x_recon

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, clip_denoised: bool = True):
        """One ancestral step x_t -> x_{t-1}; returns (x_{t-1}, predicted x_0)."""
        model_mean, _, model_log_variance, x0 = self.p_mean_variance(x, t, cond, clip_denoised)
        noise = noise_like(x.shape, x.device)
        nonzero_mask = (t != 0).float().reshape(x.shape[0], *((1,) * (x.ndim - 1)))
        return model_mean + nonzero_mask * (0.5 * model_log_variance).exp() * noise, x0

    @torch.no_grad()
    def p_sample_loop(
        self,
        shape: tuple,
        cond: Any = None,
        x_T: torch.Tensor | None = None,
        return_intermediates: bool = False,
        verbose: bool = True,
    ):
        """Run the full T-step ancestral chain; intermediates every `log_every_t` steps."""
        img = torch.randn(shape, device=self.betas.device) if x_T is None else x_T
        intermediates = [img]
        steps = reversed(range(self.num_timesteps))
        for i in tqdm(steps, desc="Sampling t", total=self.num_timesteps, disable=not verbose):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            img, _ = self.p_sample(img, t, cond, clip_denoised=self.clip_denoised)
            if i % self.log_every_t == 0 or i == self.num_timesteps - 1:
                intermediates.append(img)
        return (img, intermediates) if return_intermediates else img

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False, **kwargs):
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates, **kwargs)

    # ------------------------------------------------------------------------------------- training

    def get_input(self, batch: dict, k: str) -> torch.Tensor:
        """batch[k] as [B, C, H, W] float (datasets yield HWC)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def drop_conditioning(self, batch: dict) -> None:
        """Replace each `ucg_training` key's entries by its "val" with probability "p" (in place)."""
        for key, rule in self.ucg_training.items():
            replacement = "" if rule.get("val") is None else rule["val"]
            drop = torch.rand(len(batch[key])) < rule["p"]
            for i in torch.nonzero(drop).flatten().tolist():
                batch[key][i] = replacement

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.drop_conditioning(batch)
        loss, loss_dict = self.shared_step(batch)
        batch_size = loss_dict[next(iter(loss_dict))].numel()
        self.log_dict(
            loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=batch_size
        )
        self.log(
            "global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True, on_epoch=False
        )
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, loss_dict = self.shared_step(batch)
        with self.ema_scope():
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, sync_dist=True)
        self.log_dict(
            loss_dict_ema, prog_bar=False, logger=True, on_step=False, on_epoch=True, sync_dist=True
        )

    def on_train_batch_end(self, *args, **kwargs) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not self.use_scheduler:
            return opt
        schedule = instantiate_from_config(self.scheduler_config)
        print("Setting up LambdaLR scheduler...")
        scheduler = {
            "scheduler": LambdaLR(opt, lr_lambda=schedule.schedule),
            "interval": "step",
            "frequency": 1,
        }
        return [opt], [scheduler]

    # -------------------------------------------------------------------------------------- logging

    def _rows_to_grid(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Stack a list of n_rows [B, C, H, W] batches into one grid image [C, H', W'], a row per sample."""
        stacked = torch.stack(rows).transpose(0, 1)  # [B, n_rows, C, H, W]
        return make_grid(stacked.flatten(0, 1), nrow=len(rows))

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 2, sample: bool = True, **kwargs) -> dict:
        x = self.get_input(batch, self.first_stage_key)[:N].to(self.device)
        n_row = min(x.shape[0], n_row)
        log = {"inputs": x}
        diffusion_row = []
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                t_batch = torch.full((n_row,), t, device=self.device, dtype=torch.long)
                diffusion_row.append(self.q_sample(x_start=x[:n_row], t=t_batch))
        log["diffusion_row"] = self._rows_to_grid(diffusion_row)
        if sample:
            with self.ema_scope("Plotting"):
                samples, denoise_row = self.sample(batch_size=N, return_intermediates=True, verbose=False)
            log["samples"] = samples
            log["denoise_row"] = self._rows_to_grid([row[:n_row] for row in denoise_row])
        return log


class LatentDiffusion(DDPM):
    """DDPM on the latents of a frozen first stage, conditioned through a condition stage (e.g. CLIP)."""

    def __init__(
        self,
        first_stage_config: dict,
        cond_stage_config: dict | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        *args,
        **kwargs,
    ):
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond must not exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__":
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", [])
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor, device="cpu"))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False

        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
            self.restarted_from_ckpt = True

    def register_schedule(self, *args, **kwargs) -> None:
        super().register_schedule(*args, **kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def make_cond_schedule(self) -> None:
        """Map each of the T timesteps to one of `num_timesteps_cond` noise levels for the conditioning."""
        cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long, device="cpu")
        ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
        cond_ids[: self.num_timesteps_cond] = ids
        self.register_buffer("cond_ids", cond_ids, persistent=False)

    def instantiate_first_stage(self, config: dict) -> None:
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = disabled_train.__get__(self.first_stage_model)
        self.first_stage_model.requires_grad_(False)

    def instantiate_cond_stage(self, config: dict | str) -> None:
        if config == "__is_first_stage__":
            print("Using first stage also as cond stage.")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            print(f"Training {self.__class__.__name__} as an unconditional model.")
            self.cond_stage_model = None
        elif self.cond_stage_trainable:
            self.cond_stage_model = instantiate_from_config(config)
        else:
            model = instantiate_from_config(config)
            self.cond_stage_model = model.eval()
            self.cond_stage_model.train = disabled_train.__get__(self.cond_stage_model)
            self.cond_stage_model.requires_grad_(False)

    # -------------------------------------------------------------------------- the two outer stages

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (a list of prompts for SD v1) into what the UNet takes ([B, 77, 768])."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """Image [B, 3, H, W] in [-1, 1] -> the first stage's posterior (or latent, for VQ models)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, encoder_posterior: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A latent [B, 4, H/8, W/8] scaled by `scale_factor`, sampled from the posterior."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(
                f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented"
            )
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """Latent [B, 4, h, w] -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.differentiable_decode_first_stage(z, force_not_quantize=force_not_quantize)

    def differentiable_decode_first_stage(
        self, z: torch.Tensor, force_not_quantize: bool = False
    ) -> torch.Tensor:
        z = z / self.scale_factor
        if hasattr(self.first_stage_model, "quantize"):
            return self.first_stage_model.decode(z, force_not_quantize=force_not_quantize)
        return self.first_stage_model.decode(z)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> Any:
        """The UNet's eps for x_noisy [B, 4, h, w] at t [B]; cond is a tensor, a list of tensors, or a dict
        {"c_concat": [...], "c_crossattn": [...]} as hybrid models take."""
        if not isinstance(cond, dict):
            if not isinstance(cond, list):
                cond = [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        x_recon = self.model(x_noisy, t, **cond)
        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        return x_recon

    # ------------------------------------------------------------------------------------- training

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        """With `scale_by_std`, set scale_factor = 1 / std(latents) from the very first batch (of all ranks)."""
        if not (
            self.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self.restarted_from_ckpt
        ):
            return
        if self.scale_factor != 1.0:
            raise ValueError("scale_by_std needs scale_factor: 1.0 in the config")
        x = super().get_input(batch, self.first_stage_key).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        std = z.flatten().std()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(std)
            std = std / dist.get_world_size()
        self.scale_factor = 1.0 / std
        print(f"setting self.scale_factor to {self.scale_factor}")

    @torch.no_grad()
    def get_input(
        self,
        batch: dict,
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
    ) -> list:
        """[z, c] (plus x, x_rec and the raw conditioning on request) for a batch from the data loader."""
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()

        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key == self.first_stage_key:
                xc = x
            elif cond_key in ("caption", "coordinates_bbox", "txt"):
                xc = batch[cond_key]
            elif cond_key == "class_label":
                xc = batch
            else:
                xc = super().get_input(batch, cond_key).to(self.device)
            if bs is not None:
                xc = xc[:bs]
            c = self.get_learned_conditioning(xc) if not self.cond_stage_trainable or force_c_encode else xc

        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: dict, **kwargs) -> tuple[torch.Tensor, dict]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids[t]
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            print(f"{self.__class__.__name__}: Also optimizing conditioner params!")
            params = params + list(self.cond_stage_model.parameters())
        return params

    # -------------------------------------------------------------------------------------- logging

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, **kwargs):
        """Samples for logging: DDIM when `ddim`, else the full ancestral chain."""
        if ddim:
            from ldm.models.diffusion.ddim import DDIMSampler

            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, cond=cond, return_intermediates=True, verbose=False)

    @torch.no_grad()
    def log_images(
        self,
        batch: dict,
        N: int = 8,
        n_row: int = 4,
        sample: bool = True,
        ddim_steps: int = 50,
        ddim_eta: float = 1.0,
        plot_denoise_rows: bool = False,
        plot_progressive_rows: bool = True,
        plot_diffusion_rows: bool = True,
        unconditional_guidance_scale: float = 1.0,
        **kwargs,
    ) -> dict:
        """Images for the ImageLogger: inputs, reconstructions, the conditioning, the diffusion of an input,
        and samples with their denoising rows, each [B, 3, H, W] in [-1, 1] (rows as one grid image)."""
        use_ddim = ddim_steps is not None
        z, c, x, xrec, xc = self.get_input(
            batch, self.first_stage_key, return_first_stage_outputs=True, force_c_encode=True,
            return_original_cond=True, bs=N,
        )  # fmt: skip
        N = x.shape[0]
        n_row = min(N, n_row)
        log = {"inputs": x, "reconstruction": xrec}
        if self.model.conditioning_key is not None:
            if self.cond_stage_key in ("caption", "txt"):
                log["conditioning"] = log_txt_as_img((x.shape[2], x.shape[3]), list(xc))
            elif isinstance(xc, torch.Tensor) and xc.ndim == 4 and xc.shape[1] in (1, 3):
                log["conditioning"] = xc

        if plot_diffusion_rows:
            rows = []
            for t in range(self.num_timesteps):
                if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                    t_batch = torch.full((n_row,), t, device=self.device, dtype=torch.long)
                    rows.append(self.decode_first_stage(self.q_sample(x_start=z[:n_row], t=t_batch)))
            log["diffusion_row"] = self._rows_to_grid(rows)

        if sample:
            with self.ema_scope("Plotting"):
                samples, intermediates = self.sample_log(c, N, use_ddim, ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
            if use_ddim:
                denoise_row, progressive_row = intermediates["x_inter"], intermediates["pred_x0"]
            else:
                denoise_row = progressive_row = intermediates
            if plot_denoise_rows:
                log["denoise_row"] = self._rows_to_grid(
                    [self.decode_first_stage(z[:n_row]) for z in denoise_row]
                )
            if plot_progressive_rows:
                log["progressive_row"] = self._rows_to_grid(
                    [self.decode_first_stage(z[:n_row]) for z in progressive_row]
                )
            if unconditional_guidance_scale > 1.0 and self.cond_stage_key in ("caption", "txt"):
                uc = self.get_learned_conditioning([""] * N)
                with self.ema_scope("Plotting"):
                    samples_cfg, _ = self.sample_log(
                        c, N, True, ddim_steps or 50, eta=ddim_eta,
                        unconditional_guidance_scale=unconditional_guidance_scale, unconditional_conditioning=uc,
                    )  # fmt: skip
                log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(
                    samples_cfg
                )
        return log


class DiffusionWrapper(pl.LightningModule):
    """Holds the UNet (`diffusion_model`) and routes conditioning into it by `conditioning_key`."""

    def __init__(self, diff_model_config: dict, conditioning_key: str | None):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        if conditioning_key not in (None, "concat", "crossattn", "hybrid", "adm"):
            raise ValueError(
                f"conditioning_key '{conditioning_key}' unknown: use concat, crossattn, hybrid, adm or none"
            )
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: list[torch.Tensor] | None = None,
        c_crossattn: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if self.conditioning_key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if self.conditioning_key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))
        if self.conditioning_key == "hybrid":
            return self.diffusion_model(
                torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, 1)
            )
        return self.diffusion_model(x, t, y=c_crossattn[0])  # adm: class or embedding vector


class LatentInpaintDiffusion(LatentDiffusion):
    """LatentDiffusion whose UNet also sees the inpainting mask and the masked image's latent: hybrid
    conditioning with UNet input = [z (4), mask (1), masked-image latent (4)], the layout of the public SD
    inpainting checkpoints. Batches carry `mask` ([B, H, W, 1], 1 = repaint) and `masked_image`."""

    def __init__(
        self,
        *args,
        concat_keys: tuple[str, ...] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: list[str] | None = None,
        keep_finetune_dims: int = 4,
        c_concat_log_start: int | None = None,
        c_concat_log_end: int | None = None,
        **kwargs,
    ):
        if finetune_keys is not None:
            raise NotImplementedError("finetune_keys is not supported: set it to null")
        super().__init__(*args, **kwargs)
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key

    @torch.no_grad()
    def get_input(self, batch: dict, k: str, bs: int | None = None, **kwargs) -> list:
        """[z, {"c_concat": [mask and masked-image latent], "c_crossattn": [c]}] (plus extras on request)."""
        z, c, *rest = super().get_input(batch, k, bs=bs, force_c_encode=True, **kwargs)
        extras = []
        for key in self.concat_keys:
            x = DDPM.get_input(self, batch, key)[:bs].to(self.device)
            if key == self.masked_image_key:
                extras.append(self.get_first_stage_encoding(self.encode_first_stage(x)))
            else:
                extras.append(F.interpolate(x, size=z.shape[-2:]))
        return [z, {"c_concat": [torch.cat(extras, dim=1)], "c_crossattn": [c]}, *rest]
