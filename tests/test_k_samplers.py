"""The k-diffusion samplers: schedules, the denoiser, every algorithm against diffusers' schedulers (where
diffusers has the algorithm) or against exact solutions, seeds per image, img2img and masks, the registry,
and AUTOMATIC1111's variation seeds. The model is the small deterministic eps network of test_samplers."""

import inspect
import math
import subprocess
import sys
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import randomize_
from omegaconf import OmegaConf
from test_samplers import SHAPE, StandInModel, guided, inputs

from ldm.models.diffusion import registry
from ldm.models.diffusion.k_diffusion import algorithms, schedules
from ldm.models.diffusion.k_diffusion.denoiser import Denoiser
from ldm.models.diffusion.k_diffusion.noise import BrownianNoise, GeneratorNoise
from ldm.models.diffusion.k_diffusion.sampler import KDiffusionSampler, img2img_steps
from ldm.models.diffusion.sampling import guided_eps_fn
from ldm.modules.diffusionmodules.util import make_ddim_timesteps
from ldm.noise import slerp, variation_noise
from ldm.util import instantiate_from_config

K_SAMPLERS = [name for name in registry.SAMPLERS if name not in ("ddim", "plms", "dpm")]
SCALE = 3.0


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> StandInModel:
    return StandInModel()


def no_noise(sigma, sigma_next):
    raise AssertionError("an eta = 0 run drew noise")


def generators(seed: int = 10, n: int = 2) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# Schedules


def test_sd_v1_sigma_range(model):
    sigmas = schedules.model_sigmas(model.alphas_cumprod)
    assert sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-3)
    assert torch.all(sigmas[1:] > sigmas[:-1])
    # the fractional timestep of each step's own sigma is the step; halfway in log-sigma is t + 0.5
    t = torch.arange(1000)
    torch.testing.assert_close(schedules.sigma_to_t(sigmas, sigmas), t.float(), rtol=0, atol=1e-4)
    assert torch.equal(schedules.sigma_to_t(sigmas, sigmas, quantize=True), t)
    mid = (sigmas[:-1].log() + sigmas[1:].log()).div(2).exp()
    torch.testing.assert_close(schedules.sigma_to_t(mid, sigmas), t[:-1] + 0.5, rtol=0, atol=1e-3)
    torch.testing.assert_close(schedules.t_to_sigma(t[:-1] + 0.5, sigmas), mid, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [10, 28])
def test_schedules_against_diffusers(model, steps):
    sigmas = schedules.model_sigmas(model.alphas_cumprod)
    betas = model.betas.double().numpy().tolist()

    def diffusers_sigmas(**kwargs) -> torch.Tensor:
        scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, trained_betas=betas, **kwargs)
        scheduler.set_timesteps(steps)
        return scheduler.sigmas

    # "linspace" timesteps 999 .. 0 are integers for these step counts (999 / (S - 1)), where diffusers'
    # linear interpolation in sigma and k-diffusion's in log-sigma agree
    for name, kwargs in [
        ("normal", {}),
        ("karras", {"use_karras_sigmas": True}),
        ("exponential", {"use_exponential_sigmas": True}),
    ]:
        ours = schedules.get_sigmas(name, steps, sigmas)
        assert len(ours) == steps + 1 and ours[-1] == 0
        torch.testing.assert_close(ours, diffusers_sigmas(**kwargs), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("steps", [1, 3, 7, 10, 50, 1000])
def test_comfyui_schedules(model, steps):
    sigmas = schedules.model_sigmas(model.alphas_cumprod)
    # ComfyUI's loops, transcribed
    stride = len(sigmas) / steps
    simple = [float(sigmas[-(1 + int(x * stride))]) for x in range(steps)] + [0.0]
    torch.testing.assert_close(schedules.get_sigmas("simple", steps, sigmas), torch.tensor(simple))
    ddim, x, stride = [], 1, max(len(sigmas) // steps, 1)
    while x < len(sigmas):
        ddim.append(float(sigmas[x]))
        x += stride
    ddim_uniform = schedules.get_sigmas("ddim_uniform", steps, sigmas)
    torch.testing.assert_close(ddim_uniform, torch.tensor(ddim[::-1] + [0.0]))
    # ... which are the sigmas of the DDIM sampler's own timesteps (it cuts them to the lowest S)
    if steps < 1000:  # DDIM's timesteps for S = T run to 1000, one past the schedule
        timesteps = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
        torch.testing.assert_close(ddim_uniform[-1 - steps : -1], sigmas[timesteps].flip(0))
    sgm = schedules.get_sigmas("sgm_uniform", steps, sigmas)
    expected = [float(schedules.t_to_sigma(t, sigmas)) for t in torch.linspace(999, 0, steps + 1)[:-1]]
    torch.testing.assert_close(sgm, torch.tensor(expected + [0.0]))
    for name in schedules.SCHEDULES:
        out = schedules.get_sigmas(name, steps, sigmas)
        assert out[-1] == 0 and torch.all(out[:-1] > 0) and torch.all(out[1:] <= out[:-1]), name
        assert out[0] <= sigmas[-1] + 1e-5 and out[-2] >= sigmas[0] - 1e-6, name
    with pytest.raises(ValueError, match="unknown scheduler 'linear'"):
        schedules.get_sigmas("linear", steps, sigmas)


@pytest.mark.parametrize("name", ["dpm2", "dpm2_a", "dpmpp_3m_sde"])
def test_discard_next_to_last_sigma(model, name):
    sampler = registry.make_sampler(name, model)
    sampler.make_schedule(10, verbose=False)
    full = schedules.get_sigmas(sampler.default_scheduler, 11, sampler.model_sigmas)
    assert len(sampler.sigmas) == 11
    torch.testing.assert_close(sampler.sigmas, torch.cat([full[:-2], full[-1:]]))
    assert sampler.num_steps == 10


# The denoiser


@torch.no_grad()
def test_denoiser_is_compvis_denoiser(model):
    x_T, c, uc = inputs()
    eps_fn = guided_eps_fn(model, c, uc, SCALE)
    sigmas = schedules.model_sigmas(model.alphas_cumprod)
    x = x_T * 3.0
    for quantize in (False, True):
        denoise = Denoiser(eps_fn, sigmas, quantize)
        sigma = torch.tensor(2.5)
        t = schedules.sigma_to_t(sigma, sigmas, quantize)
        assert (t.dtype == torch.long) == quantize
        c_in = 1 / math.sqrt(2.5**2 + 1)
        expected = x - 2.5 * guided(model, x * c_in, t.expand(2), c, uc, SCALE)
        torch.testing.assert_close(denoise(x, sigma), expected, rtol=1e-5, atol=1e-5)
        assert model.calls[-1].shape == (4,)  # one batched call: cat([x, x]) with cat([uc, c])
    assert 0 < t.item() < 999

    x0, mask = inputs(seed=4)[0], torch.zeros(2, 1, *SHAPE[1:])
    mask[..., :4] = 1
    blended = Denoiser(eps_fn, sigmas, mask=mask, x0=x0)(x, torch.tensor(2.5))
    keep = mask.expand_as(x0).bool()
    assert torch.equal(blended[keep], x0[keep])
    torch.testing.assert_close(blended[~keep], Denoiser(eps_fn, sigmas)(x, torch.tensor(2.5))[~keep])


# Against diffusers


def run_diffusers(scheduler, model, x_T, c, uc, steps, noise_generators=None) -> torch.Tensor:
    """diffusers' denoising loop over the stand-in model with the same guidance."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    for t in scheduler.timesteps:
        eps = guided(model, scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]), c, uc, SCALE)
        extra = {"generator": noise_generators} if takes_generator else {}
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


DIFFUSERS_CASES = {
    # name: (diffusers scheduler, its kwargs, our algorithm, its kwargs)
    "euler": (diffusers.EulerDiscreteScheduler, {}, algorithms.euler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}, algorithms.euler_ancestral, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}, algorithms.heun, {}),
    "dpm2": (diffusers.KDPM2DiscreteScheduler, {}, algorithms.dpm2, {}),
    "dpm2_a": (diffusers.KDPM2AncestralDiscreteScheduler, {}, algorithms.dpm2_ancestral, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}, algorithms.lms, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {}, algorithms.dpmpp_2m, {}),
    "dpmpp_2m_sde": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++"},
        algorithms.dpmpp_2m_sde,
        {},
    ),
    "unipc": (diffusers.UniPCMultistepScheduler, {}, algorithms.unipc, {}),
    "unipc_order3": (diffusers.UniPCMultistepScheduler, {"solver_order": 3}, algorithms.unipc, {"order": 3}),
    # diffusers' bh1 step to sigma = 0 computes inf * 0 (B(h) = -h = -inf times a zero correction): NaN; so
    # this pair ends at sigma_min, with no zero step
    "unipc_bh1": (
        diffusers.UniPCMultistepScheduler,
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        algorithms.unipc,
        {"variant": "bh1"},
    ),
}
# diffusers by design differs here (so these pairs are not compared):
# - EulerAncestralDiscreteScheduler has no Karras sigmas;
# - KDPM2(Ancestral)DiscreteScheduler with Karras sigmas rounds the main steps' timesteps to integers but feeds
#   the midpoints' fractional ones: neither k-diffusion's fractional timesteps nor ComfyUI's quantized ones.
NOT_IN_DIFFUSERS_WITH_KARRAS = ("euler_a", "dpm2", "dpm2_a")
# The multistep solvers (DPMSolverMultistep, UniPCMultistep) feed the model timesteps rounded to integers, with
# the exact sigmas: k-diffusion's denoiser with quantize=True. Where every timestep is an integer (999 .. 0 in
# steps of 111 for S = 10) both timestep rules agree and quantize=True is used to skip an fp32 round trip.
ROUNDS_TIMESTEPS = (diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler)
INTERLEAVE_MIDPOINTS = (
    diffusers.HeunDiscreteScheduler,
    diffusers.KDPM2DiscreteScheduler,
    diffusers.KDPM2AncestralDiscreteScheduler,
)


@torch.no_grad()
@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_algorithm_matches_diffusers(model, case, karras):
    if karras and case in NOT_IN_DIFFUSERS_WITH_KARRAS:
        pytest.skip("diffusers differs by design (see NOT_IN_DIFFUSERS_WITH_KARRAS)")
    scheduler_cls, scheduler_kwargs, algorithm, algorithm_kwargs = DIFFUSERS_CASES[case]
    steps = 10
    config = dict(num_train_timesteps=1000, trained_betas=model.betas.double().numpy().tolist())
    if karras:
        config["use_karras_sigmas"] = True
    x_T, c, uc = inputs()
    reference = run_diffusers(
        scheduler_cls(**config, **scheduler_kwargs), model, x_T, c, uc, steps, generators()
    )

    interleaved = scheduler_cls in INTERLEAVE_MIDPOINTS
    # the schedulers that interleave midpoints list every sigma twice: take Euler's plain ones
    plain = (
        diffusers.EulerDiscreteScheduler(**config)
        if interleaved
        else scheduler_cls(**config, **scheduler_kwargs)
    )
    plain.set_timesteps(steps)
    sigmas = plain.sigmas
    quantize = scheduler_cls in ROUNDS_TIMESTEPS or not (karras or interleaved)
    denoise = Denoiser(
        guided_eps_fn(model, c, uc, SCALE), schedules.model_sigmas(model.alphas_cumprod), quantize
    )
    if "noise" in inspect.signature(algorithm).parameters:
        algorithm_kwargs = {**algorithm_kwargs, "noise": GeneratorNoise(x_T.shape, x_T.device, generators())}
    # the VP-form schedulers start from x_T itself (init_noise_sigma 1), i.e. x_T * sqrt(sigma_max^2 + 1) here;
    # k-diffusion and AUTOMATIC1111 start from x_T * sigma_max
    vp = scheduler_cls in ROUNDS_TIMESTEPS
    x = x_T * ((sigmas[0] ** 2 + 1) ** 0.5 if vp else sigmas[0])
    ours = algorithm(denoise, x, sigmas, **algorithm_kwargs)
    if vp:  # (a run ending at sigma_min > 0 ends at that scale too)
        ours = ours / (sigmas[-1] ** 2 + 1) ** 0.5
    diff = (ours - reference).abs().max().item()
    print(f"{case} ({'karras' if karras else 'uniform'}) vs diffusers: max abs diff {diff:.2e}")
    assert reference.std() > 0.5
    assert diff <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
def test_dpmpp_sde_matches_diffusers_brownian_tree(model, karras):
    """DPMSolverSDEScheduler draws its noise from one Brownian tree over the batch seeded noise_sampler_seed,
    as k-diffusion does for a single seed; the midpoints' timesteps are fractional on both sides."""
    config = dict(num_train_timesteps=1000, trained_betas=model.betas.double().numpy().tolist())
    if karras:
        config["use_karras_sigmas"] = True
    x_T, c, uc = inputs()
    reference = run_diffusers(
        diffusers.DPMSolverSDEScheduler(**config, noise_sampler_seed=123), model, x_T, c, uc, 10
    )
    euler = diffusers.EulerDiscreteScheduler(**config)
    euler.set_timesteps(10)
    sigmas = euler.sigmas
    denoise = Denoiser(guided_eps_fn(model, c, uc, SCALE), schedules.model_sigmas(model.alphas_cumprod))
    positive = sigmas[sigmas > 0]
    noise = BrownianNoise(x_T, positive.min(), positive.max(), seeds=123)
    ours = algorithms.dpmpp_sde(denoise, x_T * sigmas[0], sigmas, noise)
    diff = (ours - reference).abs().max().item()
    print(f"dpmpp_sde ({'karras' if karras else 'uniform'}) vs diffusers: max abs diff {diff:.2e}")
    assert diff <= 1e-4


@torch.no_grad()
def test_dpmpp_2s_matches_diffusers_singlestep_on_a_midpoint_grid(model):
    """DPM++ 2S (eta 0) takes its intermediate point at the midpoint in log-sigma; DPMSolverSinglestep (order
    2) takes it from its own timestep grid. On a grid whose every other sigma is that midpoint, with the
    timesteps rounded to integers (as diffusers feeds them: quantize=True) and ending at sigma_min, they agree.
    With eta > 0 (DPM++ 2S a) diffusers has no counterpart."""
    sigmas = schedules.model_sigmas(model.alphas_cumprod)
    main = schedules.karras(10, sigmas)[:-1]
    mids = (main[:-1].log() + main[1:].log()).div(2).exp()
    grid = torch.cat([torch.stack([main[:-1], mids], 1).flatten(), main[-1:]])
    scheduler = diffusers.DPMSolverSinglestepScheduler(
        num_train_timesteps=1000, trained_betas=model.betas.double().numpy().tolist(), solver_order=2,
        lower_order_final=False, final_sigmas_type="sigma_min",
    )  # fmt: skip
    scheduler.set_timesteps(len(grid) - 1)
    assert scheduler.order_list == [1, 2] * (len(main) - 1)
    scheduler.sigmas = grid.clone()
    timesteps = schedules.sigma_to_t(grid, sigmas, quantize=True)
    x_T, c, uc = inputs()
    x = x_T
    for i in range(len(grid) - 1):
        eps = guided(model, x, timesteps[i].expand(2), c, uc, SCALE)
        x = scheduler.step(eps, scheduler.timesteps[i], x).prev_sample
    denoise = Denoiser(guided_eps_fn(model, c, uc, SCALE), sigmas, quantize=True)
    ours = algorithms.dpmpp_2s_ancestral(denoise, x_T * (1 + main[0] ** 2) ** 0.5, main, no_noise, eta=0.0)
    diff = (ours / (1 + main[-1] ** 2) ** 0.5 - x).abs().max().item()
    print(f"dpmpp_2s (eta 0) vs diffusers' singlestep: max abs diff {diff:.2e}")
    assert x.std() > 0.5 and diff <= 1e-4


# Algorithms diffusers does not have (or has differently), against exact solutions


def gaussian_denoiser(std: float):
    """The exact denoiser of data ~ N(0, std^2 I): D(x, sigma) = x std^2 / (std^2 + sigma^2)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x * std**2 / (std**2 + sigma**2)

    return denoise


def ode_error(algorithm, steps: int, **kwargs) -> float:
    """Max error at sigma_min of an ODE solve from sigma_max on Gaussian data, whose probability-flow ODE
    has the solution x(sigma) = x(sigma_max) sqrt(std^2 + sigma^2) / sqrt(std^2 + sigma_max^2)."""
    std, sigma_min, sigma_max = 0.5, 0.03, 14.6
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma_max
    exact = x * math.sqrt(std**2 + sigma_min**2) / math.sqrt(std**2 + sigma_max**2)
    if algorithm in (algorithms.dpm_fast, algorithms.dpm_adaptive):
        out = algorithm(gaussian_denoiser(std), x, sigma_min, sigma_max, **kwargs)
    else:
        sigmas = torch.linspace(
            math.log(sigma_max), math.log(sigma_min), steps + 1, dtype=torch.float64
        ).exp()
        out = algorithm(gaussian_denoiser(std), x, sigmas, **kwargs)
    return (out - exact).abs().max().item() / exact.abs().max().item()


@pytest.mark.parametrize(
    "algorithm, kwargs, order",
    [
        (algorithms.euler, {}, 1),
        (algorithms.heun, {}, 2),
        (algorithms.dpm2, {}, 2),
        (algorithms.lms, {}, 3),
        (algorithms.dpmpp_2m, {}, 2),
        (algorithms.dpmpp_2s_ancestral, {"eta": 0.0, "noise": no_noise}, 2),
        (algorithms.dpmpp_sde, {"eta": 0.0, "noise": no_noise}, 2),
        (algorithms.dpmpp_2m_sde, {"eta": 0.0, "noise": no_noise}, 2),
        (algorithms.dpmpp_2m_sde, {"eta": 0.0, "noise": no_noise, "solver_type": "heun"}, 2),
        # third-order steps, but its first (first-order) step's O(h^2) error stays in the result
        (algorithms.dpmpp_3m_sde, {"eta": 0.0, "noise": no_noise}, 2),
        (algorithms.unipc, {}, 3),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_order_of_convergence(algorithm, kwargs, order):
    errors = [ode_error(algorithm, steps, **kwargs) for steps in (16, 32, 64)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    print(f"{algorithm.__name__}: errors {errors}, observed orders {rates}")
    assert rates[-1] > order - 0.3
    if algorithm is algorithms.dpmpp_3m_sde:
        assert errors[-1] < ode_error(algorithms.dpmpp_2m, 64) / 2


def test_dpm_fast_and_adaptive_converge():
    # order-3 steps; below ~1e-4 the fp32 step coefficients (as in k-diffusion) dominate
    errors = [ode_error(algorithms.dpm_fast, 0, n=n, noise=no_noise) for n in (6, 12, 24)]
    print(f"dpm_fast: errors {errors}")
    assert errors[0] > 2**2.5 * errors[1] > 2**5 * errors[2] and errors[2] < 1e-3
    evaluations = []

    def count(i, x, denoised):
        evaluations.append(i)

    loose = ode_error(algorithms.dpm_adaptive, 0, noise=no_noise, callback=count)
    loose_steps = len(evaluations)
    tight = ode_error(algorithms.dpm_adaptive, 0, rtol=1e-4, atol=1e-5, noise=no_noise, callback=count)
    tight_steps = len(evaluations) - loose_steps
    print(
        f"dpm_adaptive: error {loose:.2e} in {loose_steps} steps, {tight:.2e} in {tight_steps} at rtol 1e-4"
    )
    assert loose < 0.05 and tight < 1e-3 and tight_steps > loose_steps


def test_2m_sde_without_noise_is_2m():
    x = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(1)) * 14.6
    sigmas = schedules.karras(12, torch.tensor([0.03, 14.6]))
    denoise = gaussian_denoiser(0.5)
    torch.testing.assert_close(
        algorithms.dpmpp_2m_sde(denoise, x, sigmas, no_noise, eta=0.0),
        algorithms.dpmpp_2m(denoise, x, sigmas),
    )


def test_lms_coefficients_are_adams_bashforth():
    # on equal steps the LMS weights are the Adams-Bashforth ones
    sigmas = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 5.0])
    step = -1.0
    np.testing.assert_allclose(algorithms.lms_coefficients(sigmas, 0, 1), [step])
    np.testing.assert_allclose(algorithms.lms_coefficients(sigmas, 1, 2), np.array([3, -1]) / 2 * step)
    np.testing.assert_allclose(algorithms.lms_coefficients(sigmas, 2, 3), np.array([23, -16, 5]) / 12 * step)
    np.testing.assert_allclose(
        algorithms.lms_coefficients(sigmas, 3, 4), np.array([55, -59, 37, -9]) / 24 * step
    )


def test_ancestral_step_keeps_the_marginal():
    sigma, sigma_next = torch.tensor(5.0), torch.tensor(2.0)
    for eta in (0.5, 1.0):
        down, up = algorithms.ancestral_step(sigma, sigma_next, eta)
        torch.testing.assert_close(down**2 + up**2, sigma_next**2)
    down, up = algorithms.ancestral_step(sigma, sigma_next, 1.0)
    # eta = 1: the DDPM posterior std of x_next given x and x0
    torch.testing.assert_close(up, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    assert algorithms.ancestral_step(sigma, sigma_next, 0.0) == (sigma_next, 0.0)


# The samplers


def sample(name: str, model, steps: int, batch: int = 2, seed: int = 10, **kwargs) -> torch.Tensor:
    """A txt2img run as the scripts make it: x_T the first draw of each image's generator seeded seed + i."""
    _, c, uc = inputs(batch)
    gens = generators(seed, batch)
    x_T = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    out, _ = registry.make_sampler(name, model).sample(
        steps, batch, SHAPE, conditioning=c, unconditional_conditioning=uc, unconditional_guidance_scale=SCALE,
        x_T=x_T, generator=gens, verbose=False, **kwargs,
    )  # fmt: skip
    return out


@torch.no_grad()
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_every_sampler_runs_1_2_and_1000_steps(model, name):
    for steps in (1, 2, 1000):
        model.calls.clear()
        out = sample(name, model, steps)
        assert out.shape == (2, *SHAPE) and torch.isfinite(out).all(), (name, steps)
        if name not in ("dpm_adaptive", "heun", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde"):
            assert len(model.calls) == steps, (name, steps)
    cls = registry.sampler_class(name)
    assert issubclass(cls, KDiffusionSampler) and cls.supports_mask and not cls.integer_timesteps


@torch.no_grad()
@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde_heun"])
def test_image_i_does_not_depend_on_the_batch(model, name):
    batch = sample(name, model, 8, batch=4, seed=100)
    _, c, uc = inputs(4)
    for i in (0, 3):
        g = torch.Generator().manual_seed(100 + i)
        x_T = torch.randn(SHAPE, generator=g)[None]
        alone, _ = registry.make_sampler(name, model).sample(
            8, 1, SHAPE, conditioning=c[i : i + 1], unconditional_conditioning=uc[i : i + 1],
            unconditional_guidance_scale=SCALE, x_T=x_T, generator=[g], verbose=False,
        )  # fmt: skip
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-5, atol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-2


@torch.no_grad()
def test_ancestral_noise_is_each_images_next_draw(model):
    """Euler a written out with AUTOMATIC1111's CPU-generator rule: x_T is image i's first draw, step k's noise
    its (k + 2)-th."""
    _, c, uc = inputs()
    gens = generators(7)
    x_T = torch.stack([torch.randn(SHAPE, generator=g) for g in gens])
    sigmas = schedules.normal(6, schedules.model_sigmas(model.alphas_cumprod))
    denoise = Denoiser(guided_eps_fn(model, c, uc, SCALE), schedules.model_sigmas(model.alphas_cumprod))
    x = x_T * sigmas[0]
    for i in range(6):
        s, s_next = sigmas[i].item(), sigmas[i + 1].item()
        denoised = denoise(x, sigmas[i])
        up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - denoised) / s * (down - s)
        if s_next > 0:
            x = x + torch.stack([torch.randn(SHAPE, generator=g) for g in gens]) * up
    out = sample("euler_a", model, 6, seed=7)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_options_scheduler_eta_s_noise_quantize(model):
    base = sample("euler_a", model, 6)
    assert (sample("euler_a", model, 6, scheduler="karras") - base).abs().max() > 1e-2
    assert (sample("euler_a", model, 6, s_noise=0.5) - base).abs().max() > 1e-2
    torch.testing.assert_close(sample("euler_a", model, 6, eta=0.0), sample("euler", model, 6))
    assert (sample("dpmpp_2m_sde_heun", model, 6) - sample("dpmpp_2m_sde", model, 6)).abs().max() > 1e-3
    model.calls.clear()
    sample("euler", model, 6, quantize_t=True)
    assert all(t.dtype == torch.long for t in model.calls)
    model.calls.clear()
    sample("euler", model, 6)
    assert any(t.dtype == torch.float32 and t.frac().abs().max() > 0 for t in model.calls)
    with pytest.raises(ValueError, match="unknown scheduler"):
        sample("euler", model, 6, scheduler="cosine")


@torch.no_grad()
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc", "dpm2"])
def test_decode_of_the_whole_schedule_is_sample(model, name):
    x_T, c, uc = inputs()
    guidance = dict(unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False)
    sampler = registry.make_sampler(name, model)
    samples, _ = sampler.sample(8, 2, SHAPE, conditioning=c, x_T=x_T, **guidance)
    torch.testing.assert_close(sampler.decode(x_T * sampler.sigmas[0], c, 8, **guidance), samples)


@torch.no_grad()
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_img2img_runs_automatic1111s_steps(model, name):
    """strength 0.5, 20 steps: t_enc = 10 and AUTOMATIC1111 runs sigmas[9:], 11 steps, from x0 + noise *
    sigmas[9]."""
    assert [img2img_steps(s, 20) for s in (0.0, 0.5, 0.75, 1.0)] == [1, 11, 16, 20]
    assert registry.sampler_class(name).img2img_steps(0.5, 20) == 11
    x0, noise = inputs(seed=2)[0], inputs(seed=3)[0]
    _, c, uc = inputs()
    sampler = registry.make_sampler(name, model)
    sampler.make_schedule(20, verbose=False)
    t_start = img2img_steps(0.5, 20)
    z = sampler.stochastic_encode(x0, torch.full((2,), t_start), noise=noise)
    torch.testing.assert_close(z, x0 + noise * sampler.sigmas[9])
    model.calls.clear()
    out = sampler.decode(
        z, c, t_start, unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False,
        generator=generators(),
    )  # fmt: skip
    assert out.shape == x0.shape and torch.isfinite(out).all()
    if name in ("euler", "euler_a", "lms", "dpmpp_2m", "dpm_fast", "dpmpp_2m_sde", "dpmpp_3m_sde", "unipc"):
        assert len(model.calls) == t_start
    # the first model call sees z at sigma_start
    c_in = 1 / (sampler.sigmas[9] ** 2 + 1) ** 0.5
    torch.testing.assert_close(model.inputs[0][:2], z * c_in)
    # the result stays nearer x0 than pure noise would
    assert (out - x0).abs().mean() < (sample(name, model, 20) - x0).abs().mean()
    with pytest.raises(ValueError, match="t_start"):
        sampler.decode(z, c, 21, verbose=False)


@torch.no_grad()
def test_img2img_indexes_the_schedule_by_the_requested_steps(model):
    """ddim_uniform with S = 7 holds 8 steps (9 sigmas); AUTOMATIC1111 still starts at sigmas[S - t_enc - 1]."""
    _, c, uc = inputs()
    sampler = registry.make_sampler("euler", model)
    sampler.make_schedule(7, scheduler="ddim_uniform", verbose=False)
    assert len(sampler.sigmas) == 9
    x0, noise = inputs(seed=2)[0], inputs(seed=3)[0]
    for strength, start, runs in ((1.0, 0, 8), (0.5, 3, 5)):
        t_start = img2img_steps(strength, 7)
        z = sampler.stochastic_encode(x0, t_start, noise=noise)
        torch.testing.assert_close(z, x0 + noise * sampler.sigmas[start])
        model.calls.clear()
        sampler.decode(
            z, c, t_start, unconditional_guidance_scale=SCALE, unconditional_conditioning=uc, verbose=False
        )
        assert len(model.calls) == runs


@torch.no_grad()
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_mask_keeps_the_known_region(model, name):
    x0 = inputs(seed=2)[0]
    mask = torch.zeros(2, 1, *SHAPE[1:])
    mask[..., :4] = 1.0
    out = sample(name, model, 10, mask=mask, x0=x0)
    known = mask.expand_as(x0).bool()
    assert torch.equal(out[known], x0[known])
    free = sample(name, model, 10)
    assert (out - free)[~known].abs().max() > 1e-3  # the known region steers the rest


@torch.no_grad()
def test_k_sampler_drives_the_tiny_latent_diffusion(tiny_ldm):
    g = torch.Generator().manual_seed(0)
    c, uc = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0
    for name in ("dpmpp_2m", "euler_a", "dpmpp_sde"):
        samples, intermediates = registry.make_sampler(name, tiny_ldm).sample(
            4, 2, (4, 8, 8), conditioning={"c_crossattn": [c]}, unconditional_conditioning={"c_crossattn": [uc]},
            unconditional_guidance_scale=7.5, verbose=False, generator=generators(0), mask=mask, x0=x0,
        )  # fmt: skip
        assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
        assert len(intermediates["pred_x0"]) == 3  # x_T, the first and the last step
        assert torch.equal(samples[..., :4], x0[..., :4])


@torch.no_grad()
def test_k_sampler_drives_a_9_channel_inpainting_model(inpaint_config):
    """Inpainting checkpoints get the masked image through the concat conditioning, batched with the
    unconditional half like the cross-attention conditioning."""
    torch.manual_seed(0)
    model = randomize_(instantiate_from_config(inpaint_config.model)).eval()
    g = torch.Generator().manual_seed(0)
    c, uc = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    concat = torch.randn(2, 5, 8, 8, generator=g)
    seen = []
    apply_model = model.apply_model

    def recording(x, t, cond):
        seen.append((x.shape, cond["c_concat"][0].shape))
        return apply_model(x, t, cond)

    model.apply_model = recording
    cond = {"c_concat": [concat], "c_crossattn": [c]}
    uncond = {"c_concat": [concat], "c_crossattn": [uc]}
    samples, _ = registry.make_sampler("dpmpp_2m", model).sample(
        3, 2, (4, 8, 8), conditioning=cond, unconditional_conditioning=uncond, unconditional_guidance_scale=5.0,
        verbose=False, generator=generators(0),
    )  # fmt: skip
    assert samples.shape == (2, 4, 8, 8) and torch.isfinite(samples).all()
    assert seen == [((4, 4, 8, 8), (4, 5, 8, 8))] * 3


@pytest.fixture
def inpaint_config():
    return OmegaConf.load(Path(__file__).parent / "configs" / "tiny-inpaint.yaml")


def test_capabilities(model):
    stochastic = {
        "euler_a",
        "dpm2_a",
        "dpmpp_2s_a",
        "dpmpp_sde",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde",
    }
    stochastic |= {"dpm_fast", "dpm_adaptive"}  # AUTOMATIC1111 runs them with eta 1 too
    for name in K_SAMPLERS:
        cls = registry.sampler_class(name)
        assert cls.stochastic == cls.uses_eta == (name in stochastic), name


# Registry


def test_registry_names_and_aliases():
    assert set(K_SAMPLERS) == {
        "euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_a",
        "dpmpp_2m", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "unipc",
    }  # fmt: skip
    assert set(registry.SCHEDULER_LABELS) == set(registry.SCHEDULERS)
    for name, label in registry.SCHEDULER_LABELS.items():
        assert registry.canonical_scheduler(label) == name
    assert registry.canonical_name("DPM++ 2M") == "dpmpp_2m"
    assert registry.canonical_name(" euler A ") == "euler_a"
    assert registry.split_sampler_name("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert registry.split_sampler_name("DPM2 a Karras") == ("dpm2_a", "karras")
    assert registry.split_sampler_name("DPM++ 3M SDE Exponential") == ("dpmpp_3m_sde", "exponential")
    assert registry.split_sampler_name("Euler a") == ("euler_a", None)
    with pytest.raises(ValueError, match="unknown sampler 'DPM\\+\\+ 9M Karras'"):
        registry.split_sampler_name("DPM++ 9M Karras")
    assert registry.canonical_scheduler("Karras") == "karras"
    assert registry.canonical_scheduler("SGM Uniform") == "sgm_uniform"
    assert registry.canonical_scheduler("automatic") is None
    with pytest.raises(ValueError, match="unknown scheduler 'cosine'"):
        registry.canonical_scheduler("cosine")
    assert set(registry.SCHEDULERS) == set(schedules.SCHEDULES)
    for alias, target in registry.ALIASES.items():
        cls = registry.sampler_class(alias)
        assert cls is registry.sampler_class(target)
        if target in K_SAMPLERS:
            assert cls.name == alias


def test_registry_imports_no_torch():
    code = "import sys; import ldm.models.diffusion.registry as r; r.split_sampler_name('Euler a'); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# Variation seeds


def a1111_slerp(val, low, high):
    """AUTOMATIC1111's processing.slerp, transcribed."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
        1
    ) * high


def test_variation_noise_is_automatic1111s():
    shape = (4, 8, 8)
    noise, gens = variation_noise([5, 6], shape, subseeds=[50, 51], subseed_strength=0.3)
    for i in range(2):
        g = torch.Generator().manual_seed(5 + i)
        main = torch.randn(shape, generator=g)
        sub = torch.randn(shape, generator=torch.Generator().manual_seed(50 + i))
        torch.testing.assert_close(noise[i], a1111_slerp(0.3, main, sub), rtol=0, atol=0)
        # the image's generator continues after x_T, for the sampler's noise
        torch.testing.assert_close(torch.randn(shape, generator=gens[i]), torch.randn(shape, generator=g))
    plain, _ = variation_noise([5, 6], shape)
    torch.testing.assert_close(plain[1], torch.randn(shape, generator=torch.Generator().manual_seed(6)))
    torch.testing.assert_close(variation_noise([5], shape, [50], 0.0)[0][0], plain[0])
    # strength 1 is the subseed's noise (up to rounding), and the slerp keeps the norm of unit noises
    sub = torch.randn(shape, generator=torch.Generator().manual_seed(50))
    torch.testing.assert_close(variation_noise([5], shape, [50], 1.0)[0][0], sub, rtol=1e-4, atol=1e-4)
    mid = slerp(0.5, plain[0], sub)
    assert 0.9 < mid.std() < 1.1
    x = torch.randn(shape)
    torch.testing.assert_close(slerp(0.2, x, x * 1.0001), a1111_slerp(0.2, x, x * 1.0001))
    with pytest.raises(ValueError, match="1 subseeds for 2 seeds"):
        variation_noise([5, 6], shape, [50], 0.5)


@torch.no_grad()
def test_ddim_uniform_euler_visits_ddims_timesteps(model):
    """With the ddim_uniform schedule the model is called at DDIM's timesteps 901, 801, ..., 1."""
    sample("euler", model, 10, scheduler="ddim_uniform", quantize_t=True)
    assert [int(t[0]) for t in model.calls[-10:]] == list(range(901, 0, -100))
