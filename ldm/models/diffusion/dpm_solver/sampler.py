"""DPM-Solver++(2M) sampler (Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): the multistep, order-2, data-prediction solver of the diffusion ODE, with
time-uniform steps on the discrete VP schedule, as the original repo's DPMSolverSampler runs it."""

import numpy as np
import torch

from ldm.models.diffusion.sampling import EpsFn, RunOptions, Sampler


class DPMSolverSampler(Sampler):
    """DPM-Solver++(2M) in S model calls, first and (for S < 15) last steps first order.

    The discrete schedule becomes continuous time t in [1/T, 1] with log alpha_t interpolated linearly
    between t_n = (n + 1) / T and 0.5 * log alphas_cumprod[n]; the S + 1 time points are uniform from 1 down
    to 1/T, and the model is fed the non-integer timesteps (t - 1/T) * T (999.0, 899.1, ... for S=10).

    Same entry points as DDIMSampler (eta must be 0; no mask, x0 or quantize_x0). For img2img,
    `make_schedule(S)`, `z = stochastic_encode(x0, t_enc_batch)` noises x0 to time point t_enc (0 = least
    noisy, S = pure noise) and `decode(z, c, t_enc, ...)` solves from there to the end in t_enc steps, the
    last t_enc steps of the S-step run.
    """

    name = "DPM-Solver"
    supports_mask = False
    integer_timesteps = False

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """The S + 1 time points (index k ascending in noise) and the constants of each step."""
        if ddim_eta != 0:
            raise ValueError(f"DPM-Solver is deterministic: eta must be 0, got {ddim_eta}")
        if ddim_discretize != "uniform":
            raise ValueError(f"DPM-Solver spaces its steps uniformly in time, not '{ddim_discretize}'")
        if ddim_num_steps < 1:
            raise ValueError(f"number of sampling steps must be at least 1, got {ddim_num_steps}")
        T = self.ddpm_num_timesteps
        t_grid = np.linspace(1.0 / T, 1.0, ddim_num_steps + 1)
        log_alpha = np.interp(t_grid, np.arange(1, T + 1) / T, 0.5 * np.log(self._alphas_cumprod()))
        alpha = np.exp(log_alpha)
        sigma = np.sqrt(1.0 - alpha**2)
        lam = log_alpha - np.log(sigma)
        h = lam[:-1] - lam[1:]  # h[k]: the step from time point k + 1 to k, in half-log-SNR
        r = np.ones_like(h)  # r[k]: the previous step's h over this one's (unused on the first step)
        r[:-1] = h[1:] / h[:-1]

        def dev(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.astype(np.float32)).to(self.device)

        self.dpm_timesteps = dev((t_grid - 1.0 / T) * T)  # what the model is fed at each time point
        self.dpm_alphas, self.dpm_sigmas = dev(alpha), dev(sigma)
        self.dpm_ratios = dev(sigma[:-1] / sigma[1:])  # [S]: the weight of x in each step
        self.dpm_phis = dev(alpha[:-1] * np.expm1(-h))  # [S]: minus the weight of the x0 estimate
        self.dpm_half_inv_r = dev(0.5 / r)  # [S]: the weight of the x0 difference in 2nd-order steps
        self.dpm_alphas_cumprod = dev(alpha**2)  # [S + 1]: alpha-bar of each time point
        if verbose:
            print(f"Selected timesteps for DPM-Solver: {self.dpm_timesteps.flip(0).cpu().numpy()}")

    def level_alphas(self) -> torch.Tensor:
        return self.dpm_alphas_cumprod

    @property
    def num_steps(self) -> int:
        return len(self.dpm_phis)

    def _sample_loop(
        self, x: torch.Tensor, eps_fn: EpsFn, n_steps: int, options: RunOptions
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        if options.mask is not None or options.quantize_denoised or options.use_original_steps:
            raise ValueError("DPMSolverSampler supports neither mask/x0, quantize_x0 nor use_original_steps")

        def predict_x0(x: torch.Tensor, k: int) -> torch.Tensor:
            eps = eps_fn(x, self.dpm_timesteps[k], self.dpm_alphas_cumprod[k])
            return (x - self.dpm_sigmas[k] * eps) / self.dpm_alphas[k]

        intermediates = {"x_inter": [x], "pred_x0": [x]}
        if n_steps == 0:
            return x, intermediates
        x0_cur = predict_x0(x, n_steps)
        x0_prev = x0_cur  # no history yet: the first step is first order
        for n, k in enumerate(self._progress(n_steps, options)):
            if n == 0 or (k == 0 and n_steps < 15):
                x = self.dpm_ratios[k] * x - self.dpm_phis[k] * x0_cur
            else:
                d1 = self.dpm_half_inv_r[k] * (x0_cur - x0_prev)
                x = self.dpm_ratios[k] * x - self.dpm_phis[k] * (x0_cur + d1)
            if options.callback:
                options.callback(n)
            if options.img_callback:
                options.img_callback(x0_cur, n)
            self._log(intermediates, k, n_steps, options, x, x0_cur)
            if k > 0:
                x0_prev, x0_cur = x0_cur, predict_x0(x, k)
        return x, intermediates
