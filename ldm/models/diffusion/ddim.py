"""DDIM sampler (Song et al., "Denoising Diffusion Implicit Models"): deterministic for eta = 0."""

import torch

from ldm.models.diffusion.sampling import EpsFn, RunOptions, Sampler


class DDIMSampler(Sampler):
    """DDIM over the "uniform" timesteps [1, 1 + T/S, ...], the lowest step landing on alphas_cumprod[0].

    txt2img: `sample(S, batch_size, shape, conditioning=c, unconditional_guidance_scale=7.5,
    unconditional_conditioning=uc, eta=0.0, x_T=None, generator=g)`.
    img2img: `make_schedule(S, ddim_eta=eta)`, `z = stochastic_encode(x0, t_enc_batch, generator=g)`,
    `decode(z, c, t_enc, unconditional_guidance_scale=..., unconditional_conditioning=uc, generator=g)`.
    """

    name = "DDIM"
    uses_eta = True

    def _sample_loop(
        self, x: torch.Tensor, eps_fn: EpsFn, n_steps: int, options: RunOptions
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        steps = self._steps(options.use_original_steps)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        for n, i in enumerate(self._progress(n_steps, options)):
            t = steps.timesteps[i]
            x = self._blend_known(x, t, options)
            e_t = eps_fn(x, t, steps.alphas[i])
            x, pred_x0 = self._ddim_update(x, e_t, steps, i, options)
            if options.callback:
                options.callback(n)
            if options.img_callback:
                options.img_callback(pred_x0, n)
            self._log(intermediates, i, n_steps, options, x, pred_x0)
        return x, intermediates
