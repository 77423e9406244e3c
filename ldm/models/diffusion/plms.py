"""PLMS sampler (Liu et al., "Pseudo Numerical Methods for Diffusion Models on Manifolds"): DDIM steps
driven by a linear-multistep combination of the model's recent eps predictions."""

import torch

from ldm.models.diffusion.sampling import EpsFn, RunOptions, Sampler


class PLMSSampler(Sampler):
    """PLMS over the DDIM "uniform" timesteps; eta must be 0.

    The first step is a pseudo improved-Euler step (the model runs again at the next timestep and the two
    eps are averaged), so S steps take S + 1 model calls; later steps use 2nd-, 3rd- and 4th-order
    Adams-Bashforth combinations of the last eps predictions.

    Same entry points as DDIMSampler: `sample(...)` from noise, and for img2img
    `make_schedule(S)`, `stochastic_encode(x0, t_enc_batch)`, `decode(z, c, t_enc, ...)`, which runs the
    last t_enc steps (restarting the multistep history at the first of them).
    """

    name = "PLMS"

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _sample_loop(
        self, x: torch.Tensor, eps_fn: EpsFn, n_steps: int, options: RunOptions
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        steps = self._steps(options.use_original_steps)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        old_eps: list[torch.Tensor] = []
        for n, i in enumerate(self._progress(n_steps, options)):
            t = steps.timesteps[i]
            x = self._blend_known(x, t, options)
            e_t = eps_fn(x, t, steps.alphas[i])
            if len(old_eps) == 0:
                # pseudo improved Euler: eps at the DDIM guess of the next step (the same step on the last)
                i_next = max(i - 1, 0)
                x_next, _ = self._ddim_update(x, e_t, steps, i, options)
                e_next = eps_fn(x_next, steps.timesteps[i_next], steps.alphas[i_next])
                e_prime = (e_t + e_next) / 2
            elif len(old_eps) == 1:
                e_prime = (3 * e_t - old_eps[-1]) / 2
            elif len(old_eps) == 2:
                e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
            else:
                e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
            x, pred_x0 = self._ddim_update(x, e_prime, steps, i, options)
            old_eps = [*old_eps[-2:], e_t]
            if options.callback:
                options.callback(n)
            if options.img_callback:
                options.img_callback(pred_x0, n)
            self._log(intermediates, i, n_steps, options, x, pred_x0)
        return x, intermediates
