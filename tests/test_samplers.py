"""DDIM, PLMS and DPM-Solver++ against diffusers and against plain transcriptions of the original algorithms,
driven by a small deterministic eps network behind the interface LatentDiffusion gives samplers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.util import make_beta_schedule

SHAPE = (4, 8, 8)
CTX = (6, 16)  # tokens, context width of the stand-in conditioning


def alpha_bar(log_alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alpha-bar [B] at timesteps t [B], log-linearly interpolated between integer timesteps."""
    t = t.double().clamp(0, len(log_alphas_cumprod) - 1)
    j = t.floor().clamp(max=len(log_alphas_cumprod) - 2).long()
    w = t - j
    return torch.exp((1 - w) * log_alphas_cumprod[j] + w * log_alphas_cumprod[j + 1]).float()


class TinyEps(torch.nn.Module):
    """eps of data ~ N(0, I) (sqrt(1 - alpha-bar_t) * x) plus a nonlinear conv term mixing x, a sinusoidal
    embedding of t and the mean-pooled conditioning, so predictions stay eps-like at every noise level."""

    def __init__(self, log_alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.log_alphas_cumprod = log_alphas_cumprod
        self.conv_in = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.t_proj = torch.nn.Linear(16, 32)
        self.c_proj = torch.nn.Linear(CTX[1], 32)
        self.conv_out = torch.nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8) / 8)
        angles = t.float()[:, None] * freqs[None]
        temb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
        h = self.conv_in(x) + (self.t_proj(temb) + self.c_proj(ctx.mean(1)))[:, :, None, None]
        a = alpha_bar(self.log_alphas_cumprod, t).view(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + self.conv_out(torch.tanh(2.0 * h))


class StandInModel:
    """Exactly the interface the samplers use, with the SD v1 schedule; records every call."""

    def __init__(self, parameterization: str = "eps") -> None:
        betas = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012), dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.num_timesteps = 1000
        self.parameterization = parameterization
        self.betas = betas.float()
        self.alphas_cumprod = alphas_cumprod.float()
        self.alphas_cumprod_prev = torch.cat(
            [torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]
        ).float()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.net = TinyEps(torch.log(alphas_cumprod)).eval()
        self.calls: list[torch.Tensor] = []  # t of each apply_model call
        self.inputs: list[torch.Tensor] = []  # x of each apply_model call
        self.q_samples: list[torch.Tensor] = []

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The network's eps; cond a tensor, a list of tensors or {"c_crossattn": [...]}."""
        if isinstance(cond, dict):
            cond = cond["c_crossattn"]
        if isinstance(cond, list):
            cond = torch.cat(cond, dim=1)
        return self.net(x, t, cond)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.calls.append(t.clone())
        self.inputs.append(x.clone())
        out = self.eps(x, t, cond)
        if self.parameterization == "x0":
            a = alpha_bar(self.net.log_alphas_cumprod, t).view(-1, 1, 1, 1)
            out = (x - (1 - a).sqrt() * out) / a.sqrt()
        return out

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise = torch.randn_like(x_start) if noise is None else noise
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = a.sqrt() * x_start + (1 - a).sqrt() * noise
        self.q_samples.append(out)
        return out


def inputs(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_T, c, uc for a batch."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn((batch, *SHAPE), generator=g),
        torch.randn((batch, *CTX), generator=g),
        torch.randn((batch, *CTX), generator=g) * 0.3,
    )


def guided(model: StandInModel, x: torch.Tensor, t: torch.Tensor, c, uc, scale: float) -> torch.Tensor:
    """Classifier-free guided eps computed the plain way, for the references."""
    e_u, e_c = model.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
    return e_u + scale * (e_c - e_u)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread runs them faster than several contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> StandInModel:
    return StandInModel()


@torch.no_grad()
def test_ddim_schedule(model):
    sampler = DDIMSampler(model)
    sampler.make_schedule(10, ddim_eta=0.0, verbose=False)
    assert sampler.ddim_timesteps.tolist() == list(range(1, 1000, 100))
    ac = model.alphas_cumprod.double()
    assert sampler.ddim_alphas_prev[0].item() == pytest.approx(ac[0].item(), abs=1e-7)
    assert sampler.ddim_alphas_prev[0].item() == pytest.approx(0.99915, abs=1e-6)
    torch.testing.assert_close(sampler.ddim_alphas_prev[1:].double(), ac[1:901:100], rtol=1e-6, atol=0)
    assert torch.all(sampler.ddim_sigmas == 0)

    sampler.make_schedule(10, ddim_eta=1.0, verbose=False)
    a, a_prev = ac[1::100], torch.cat([ac[:1], ac[1:901:100]])
    expected = torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    assert torch.all(expected > 0)
    torch.testing.assert_close(sampler.ddim_sigmas.double(), expected, rtol=1e-5, atol=1e-7)


@torch.no_grad()
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(model, eta):
    x_T, c, uc = inputs()
    scale = 7.5
    samples, intermediates = DDIMSampler(model).sample(
        10, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=scale,
        eta=eta, x_T=x_T, verbose=False, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert len(model.calls) == 10 and all(t.shape == (4,) for t in model.calls)
    assert [int(t[0]) for t in model.calls] == list(range(901, 0, -100))

    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(901, 0, -100))
    noise_g = torch.Generator().manual_seed(5)
    x = x_T
    for t in scheduler.timesteps:
        e = guided(model, x, t.repeat(2), c, uc, scale)
        noise = torch.randn(x.shape, generator=noise_g) if eta > 0 else None
        x = scheduler.step(e, t, x, eta=eta, variance_noise=noise).prev_sample
    diff = (samples - x).abs().max().item()
    print(f"DDIM eta={eta} vs diffusers: max abs diff {diff:.2e} (sample std {x.std():.3f})")
    assert diff <= 1e-4
    assert x.std() > 0.3
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 3  # x_T, first and last step


def plms_reference(model: StandInModel, x: torch.Tensor, c, uc, scale: float, steps: int) -> torch.Tensor:
    """The original PLMS loop, transcribed plainly."""
    timesteps = list(range(1, 1000, 1000 // steps))
    ac = model.alphas_cumprod
    alphas = [ac[t].item() for t in timesteps]
    alphas_prev = [ac[0].item()] + alphas[:-1]
    time_range = timesteps[::-1]

    def eps(x, step):
        return guided(model, x, torch.full((x.shape[0],), step, dtype=torch.long), c, uc, scale)

    def x_prev_of(x, e, index):
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * e

    old_eps = []
    for i, step in enumerate(time_range):
        index = steps - i - 1
        step_next = time_range[min(i + 1, len(time_range) - 1)]
        e_t = eps(x, step)
        if len(old_eps) == 0:
            e_prime = (e_t + eps(x_prev_of(x, e_t, index), step_next)) / 2
        elif len(old_eps) == 1:
            e_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(x, e_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return x


@torch.no_grad()
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_plms_matches_the_original_algorithm(model, steps):
    x_T, c, uc = inputs()
    samples, _ = PLMSSampler(model).sample(
        steps, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=7.5,
        x_T=x_T, verbose=False,
    )  # fmt: skip
    assert len(model.calls) == steps + 1
    reference = plms_reference(model, x_T, c, uc, 7.5, steps)
    diff = (samples - reference).abs().max().item()
    print(f"PLMS S={steps} vs transcription: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    with pytest.raises(ValueError, match="eta"):
        PLMSSampler(model).sample(steps, 2, SHAPE, conditioning=c, eta=0.5, x_T=x_T, verbose=False)


def dpm_solver_reference(
    model: StandInModel, x: torch.Tensor, c, uc, scale: float, steps: int
) -> torch.Tensor:
    """The original DPM-Solver++(2M) configuration (NoiseScheduleVP 'discrete', time_uniform, multistep,
    order 2, lower_order_final), transcribed plainly in fp32."""
    N = 1000
    t_array = torch.linspace(0.0, 1.0, N + 1)[1:]
    log_alpha_array = 0.5 * torch.log(model.alphas_cumprod)

    def log_alpha_of(t):
        j = torch.clamp(torch.searchsorted(t_array, t) - 1, 0, N - 2)
        w = (t - t_array[j]) / (t_array[j + 1] - t_array[j])
        return log_alpha_array[j] + w * (log_alpha_array[j + 1] - log_alpha_array[j])

    def alpha_sigma_lambda(t):
        la = log_alpha_of(t)
        return torch.exp(la), torch.sqrt(1 - torch.exp(2 * la)), la - 0.5 * torch.log(1 - torch.exp(2 * la))

    def data_prediction(x, t):
        noise = guided(model, x, ((t - 1.0 / N) * 1000.0).expand(x.shape[0]), c, uc, scale)
        alpha, sigma, _ = alpha_sigma_lambda(t)
        return (x - sigma * noise) / alpha

    timesteps = torch.linspace(1.0, 1.0 / N, steps + 1)
    models, times = [data_prediction(x, timesteps[0])], [timesteps[0]]
    for step in range(1, steps + 1):
        t = timesteps[step]
        order = 1 if step == 1 else (min(2, steps + 1 - step) if steps < 15 else 2)
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(t)
        _, sigma_s, lambda_s = alpha_sigma_lambda(times[-1])
        h = lambda_t - lambda_s
        x_new = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * models[-1]
        if order == 2:
            _, _, lambda_s1 = alpha_sigma_lambda(times[-2])
            r0 = (lambda_s - lambda_s1) / h
            d1 = (models[-1] - models[-2]) / r0
            x_new = x_new - 0.5 * alpha_t * (torch.exp(-h) - 1.0) * d1
        x = x_new
        times.append(t)
        if step < steps:
            models.append(data_prediction(x, t))
    return x


@torch.no_grad()
def test_dpm_solver_timesteps_and_original_algorithm(model):
    x_T, c, uc = inputs()
    for steps in (10, 20):
        model.calls.clear()
        samples, _ = DPMSolverSampler(model).sample(
            steps, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=7.5,
            x_T=x_T, verbose=False,
        )  # fmt: skip
        assert len(model.calls) == steps
        assert model.calls[0].dtype == torch.float32
        if steps == 10:
            fed = torch.stack([t[0] for t in model.calls])
            expected = torch.tensor([999.0 - 99.9 * k for k in range(10)])
            torch.testing.assert_close(fed, expected, rtol=0, atol=1e-3)
        reference = dpm_solver_reference(model, x_T, c, uc, 7.5, steps)
        diff = (samples - reference).abs().max().item()
        print(f"DPM-Solver S={steps} vs transcription: max abs diff {diff:.2e}")
        assert diff <= 1e-4


@torch.no_grad()
def test_dpm_solver_converges_to_the_ode_solution(model):
    x_T, c, uc = inputs(batch=1)
    kwargs = dict(
        conditioning=c,
        unconditional_conditioning=uc,
        unconditional_guidance_scale=3.0,
        x_T=x_T,
        verbose=False,
    )
    # DDIM with 500 steps visits 999, 997, ..., 1: the same ODE, from the same start, finely discretized.
    reference, _ = DDIMSampler(model).sample(500, 1, SHAPE, **kwargs)
    distances = []
    for steps in (5, 10, 25, 50):
        samples, _ = DPMSolverSampler(model).sample(steps, 1, SHAPE, **kwargs)
        distances.append((samples - reference).abs().max().item())
    ddim10, _ = DDIMSampler(model).sample(10, 1, SHAPE, **kwargs)
    ddim_distance = (ddim10 - reference).abs().max().item()
    print(f"DPM-Solver distance to DDIM-500 for 5/10/25/50 steps: {distances}; DDIM-10: {ddim_distance:.3e}")
    assert distances[0] > distances[1] > distances[2] > distances[3]
    assert distances[1] < ddim_distance


@torch.no_grad()
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_conditioning_forms_and_batch_checks(model, sampler_cls):
    x_T, c, uc = inputs()
    kwargs = dict(unconditional_guidance_scale=5.0, x_T=x_T, verbose=False)
    plain, _ = sampler_cls(model).sample(4, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, **kwargs)
    as_dict, _ = sampler_cls(model).sample(
        4,
        2,
        SHAPE,
        conditioning={"c_crossattn": [c]},
        unconditional_conditioning={"c_crossattn": [uc]},
        **kwargs,
    )
    as_list, _ = sampler_cls(model).sample(
        4, 2, SHAPE, conditioning=[c], unconditional_conditioning=[uc], **kwargs
    )
    torch.testing.assert_close(as_dict, plain, rtol=0, atol=0)
    torch.testing.assert_close(as_list, plain, rtol=0, atol=0)

    with pytest.raises(ValueError, match="batch size 3"):
        sampler_cls(model).sample(4, 2, SHAPE, conditioning=torch.randn(3, *CTX), verbose=False)
    with pytest.raises(ValueError, match="unconditional_conditioning has batch size 1"):
        sampler_cls(model).sample(
            4, 2, SHAPE, conditioning=c, unconditional_conditioning=uc[:1], unconditional_guidance_scale=5.0,
            verbose=False,
        )  # fmt: skip
    with pytest.raises(ValueError, match="batch size 3"):
        sampler_cls(model).sample(
            4, 2, SHAPE, conditioning={"c_crossattn": [torch.randn(3, *CTX)]}, verbose=False
        )

    # scale 1 or no uc: a single conditional call per model evaluation
    model.calls.clear()
    sampler_cls(model).sample(
        4, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, x_T=x_T, verbose=False
    )
    assert all(t.shape == (2,) for t in model.calls)


@torch.no_grad()
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_decode_from_the_start_is_sample(model, sampler_cls):
    x_T, c, uc = inputs()
    guidance = dict(unconditional_guidance_scale=4.0, unconditional_conditioning=uc)
    sampler = sampler_cls(model)
    samples, _ = sampler.sample(8, 2, SHAPE, conditioning=c, x_T=x_T, verbose=False, **guidance)
    decoded = sampler.decode(x_T, c, 8, verbose=False, **guidance)
    torch.testing.assert_close(decoded, samples, rtol=0, atol=0)

    model.calls.clear()
    x0, noise = inputs(seed=2)[0], inputs(seed=3)[0]
    t_enc = 5
    z = sampler.stochastic_encode(x0, torch.full((2,), t_enc), noise=noise)
    a = sampler.level_alphas()[t_enc]
    torch.testing.assert_close(z, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    out = sampler.decode(z, c, t_enc, verbose=False, **guidance)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert len(model.calls) == t_enc + (sampler_cls is PLMSSampler)
    torch.testing.assert_close(sampler.decode(z, c, 0, verbose=False), z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="t_start"):
        sampler.decode(z, c, 9, verbose=False)


@torch.no_grad()
def test_dpm_solver_encode_level_is_its_time_point(model):
    sampler = DPMSolverSampler(model)
    sampler.make_schedule(10, verbose=False)
    ac = model.alphas_cumprod
    assert sampler.level_alphas()[0].item() == pytest.approx(ac[0].item(), rel=1e-6)
    assert sampler.level_alphas()[10].item() == pytest.approx(ac[999].item(), rel=1e-5)
    assert sampler.dpm_timesteps[0].item() == 0.0 and sampler.dpm_timesteps[10].item() == 999.0


@torch.no_grad()
def test_mask_keeps_the_known_region(model):
    x_T, c, uc = inputs()
    x0 = inputs(seed=2)[0]
    mask = torch.zeros(2, 1, *SHAPE[1:])
    mask[..., :4] = 1.0  # left half known
    samples, _ = DDIMSampler(model).sample(
        20, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=5.0,
        x_T=x_T, mask=mask, x0=x0, verbose=False, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert len(model.q_samples) == 20
    last_input = model.inputs[-1][:2]  # the unconditional half of the final guided call
    known = mask.expand_as(x0).bool()
    torch.testing.assert_close(last_input[known], model.q_samples[-1][known], rtol=0, atol=0)
    # the last step starts from x0 noised to t=1 (std 0.041) and keeps most of that noise
    known_error, free_error = (samples - x0)[known].abs().mean(), (samples - x0)[~known].abs().mean()
    print(f"mask: mean |sample - x0| known {known_error:.3f}, free {free_error:.3f}")
    assert known_error < 0.05 and free_error > 0.3


@torch.no_grad()
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_generator_makes_runs_reproducible(model, sampler_cls):
    _, c, uc = inputs()
    eta = 0.5 if sampler_cls is DDIMSampler else 0.0

    def run(seed):
        return sampler_cls(model).sample(
            5, 2, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=3.0,
            eta=eta, verbose=False, generator=torch.Generator().manual_seed(seed),
        )[0]  # fmt: skip

    torch.testing.assert_close(run(7), run(7), rtol=0, atol=0)
    assert (run(7) - run(8)).abs().max() > 0.1


@torch.no_grad()
def test_ddim_noise_depends_on_eta_only_through_the_generator(model):
    x_T, c, _ = inputs()
    sampler = DDIMSampler(model)
    kwargs = dict(conditioning=c, x_T=x_T, verbose=False)
    deterministic, _ = sampler.sample(5, 2, SHAPE, eta=0.0, **kwargs)
    again, _ = sampler.sample(5, 2, SHAPE, eta=0.0, **kwargs)
    torch.testing.assert_close(deterministic, again, rtol=0, atol=0)
    a, _ = sampler.sample(5, 2, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(1), **kwargs)
    b, _ = sampler.sample(5, 2, SHAPE, eta=1.0, generator=torch.Generator().manual_seed(2), **kwargs)
    assert (a - b).abs().max() > 0.05


@torch.no_grad()
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_x0_prediction_models_give_the_same_samples(sampler_cls):
    x_T, c, uc = inputs()
    kwargs = dict(
        conditioning=c,
        unconditional_conditioning=uc,
        unconditional_guidance_scale=3.0,
        x_T=x_T,
        verbose=False,
    )
    eps_model, x0_model = StandInModel("eps"), StandInModel("x0")
    expected, _ = sampler_cls(eps_model).sample(6, 2, SHAPE, **kwargs)
    got, _ = sampler_cls(x0_model).sample(6, 2, SHAPE, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_samplers_drive_the_tiny_latent_diffusion(tiny_ldm, sampler_cls):
    g = torch.Generator().manual_seed(0)
    c, uc = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    masking = dict(mask=mask, x0=x0) if sampler_cls is not DPMSolverSampler else {}
    samples, intermediates = sampler_cls(tiny_ldm).sample(
        4, 2, (4, 8, 8), conditioning={"c_crossattn": [c]}, unconditional_conditioning={"c_crossattn": [uc]},
        unconditional_guidance_scale=7.5, verbose=False, generator=g, **masking,
    )  # fmt: skip
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    assert torch.isfinite(intermediates["pred_x0"][-1]).all()
    if masking:
        assert (samples - x0)[mask.expand_as(x0).bool()].abs().mean() < 0.1


def test_sample_refuses_unknown_keywords(model):
    """The original dropped unknown keywords silently (a misspelt `unconditional_guidance_scal` did nothing)."""
    with pytest.raises(TypeError, match="unconditional_guidance_scal"):
        DDIMSampler(model).sample(2, 1, SHAPE, unconditional_guidance_scal=5.0, verbose=False)


def test_registry_names_aliases_and_capabilities():
    from ldm.models.diffusion.registry import SAMPLERS, canonical_name, sampler_class

    assert {"ddim", "plms", "dpm"} <= set(SAMPLERS)
    assert canonical_name(" DDIM ") == "ddim" and canonical_name("dpm-solver") == "dpm"
    assert sampler_class("ddim") is DDIMSampler and sampler_class("PLMS") is PLMSSampler
    assert DDIMSampler.uses_eta and not PLMSSampler.uses_eta and not DPMSolverSampler.supports_mask
    assert not DPMSolverSampler.integer_timesteps and PLMSSampler.supports_mask
    with pytest.raises(ValueError, match="unknown sampler 'euler-z'"):
        canonical_name("euler-z")


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, PLMSSampler, DPMSolverSampler])
@pytest.mark.parametrize("steps", [1, 2, 499, 501, 999, 1000])
def test_every_step_count_up_to_the_schedule_runs(model, sampler_cls, steps):
    """1..T steps all run (the original indexed past the schedule at S = T); the DDIM schedules refuse more
    than T (DPM-Solver's continuous time could take more; the scripts refuse them up front)."""
    x_T, c, _ = inputs(batch=1)
    sampler = sampler_cls(model)
    samples, _ = sampler.sample(steps, 1, SHAPE, conditioning=c, x_T=x_T, verbose=False)
    assert torch.isfinite(samples).all() and sampler.num_steps == steps
    if sampler_cls is not DPMSolverSampler:
        assert sampler.ddim_timesteps.max() <= 999 and len(set(sampler.ddim_timesteps.tolist())) == steps
        with pytest.raises(ValueError, match="1..1000"):
            sampler.sample(1001, 1, SHAPE, conditioning=c, x_T=x_T, verbose=False)
