"""The k-diffusion sampling algorithms, one function each, over a denoiser D(x, sigma) -> x0 estimate.

Written from the papers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"; Lu et al. 2022, DPM-Solver and DPM-Solver++; Zhao et al. 2023, UniPC) to behave as Katherine
Crowson's k-diffusion does (the reference AUTOMATIC1111 and ComfyUI run). x is in k-diffusion's scale
(x0 + sigma * noise); `sigmas` [N + 1] descend to 0 (the last step lands on the denoised estimate).
Scalars are 0-dim float32 tensors, as in k-diffusion. `noise(sigma, sigma_next)` gives the unit-variance noise
of a step (ldm.models.diffusion.k_diffusion.noise); `eta` scales the ancestral/SDE noise (0: the ODE, and then
no noise is drawn, where k-diffusion draws and multiplies it by 0) and `s_noise` the drawn noise. `callback(i, x, denoised)` runs after the first model evaluation of step i.
"""

from collections.abc import Callable

import numpy as np
import torch
from tqdm import trange

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE: (x - D(x)) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add noise of std sigma_up, so that
    the marginal at sigma_next is right. eta = 1 is DDPM's ancestral step, eta = 0 the ODE step."""
    if not eta:
        return sigma_next, torch.zeros(())
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """DPM-Solver's time t = -log(sigma) (half-log-SNR of the VE view)."""
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def _steps(sigmas: torch.Tensor, progress: bool) -> range:
    return trange(len(sigmas) - 1, disable=not progress)


def euler(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback = None, progress=False):
    """Euler steps of the ODE (Karras et al. Algorithm 2 without churn)."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def euler_ancestral(
    denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback: Callback = None, progress=False
):
    """Euler step down to sigma_down, then fresh noise up to sigma_next."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback:
            callback(i, x, denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def heun(denoise: Denoise, x, sigmas, callback: Callback = None, progress=False):
    """Heun's second-order method (Karras et al. Algorithm 2 without churn); Euler on the step to 0."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], denoise(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def _dpm2_step(denoise: Denoise, x, sigma, sigma_to, d):
    """DPM-Solver-2 from sigma to sigma_to: the slope at the log-midpoint, reached by an Euler half step."""
    sigma_mid = sigma.log().lerp(sigma_to.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, denoise(x_2, sigma_mid))
    return x + d_2 * (sigma_to - sigma)


def dpm2(denoise: Denoise, x, sigmas, callback: Callback = None, progress=False):
    """DPM-Solver-2 steps (midpoint in log-sigma); Euler on the step to 0."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x = _dpm2_step(denoise, x, sigmas[i], sigmas[i + 1], d)
    return x


def dpm2_ancestral(
    denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback: Callback = None, progress=False
):
    """DPM-Solver-2 step down to sigma_down, then fresh noise up to sigma_next."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback:
            callback(i, x, denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            x = _dpm2_step(denoise, x, sigmas[i], sigma_down, d)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Weights of d_i, d_{i-1}, ... in the step from sigmas[i] to sigmas[i+1]: the integrals over that step of
    the Lagrange basis polynomials through sigmas[i], ..., sigmas[i - order + 1] (computed exactly)."""
    nodes = [sigmas[i - j] for j in range(order)]
    weights = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
        basis = basis / np.prod([nodes[j] - o for o in others])
        antiderivative = basis.integ()
        weights.append(float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i])))
    return weights


def lms(denoise: Denoise, x, sigmas, order: int = 4, callback: Callback = None, progress=False):
    """Linear multistep: Adams-Bashforth on the ODE in sigma with the last `order` slopes."""
    sigmas_host = sigmas.double().numpy()
    ds: list[torch.Tensor] = []
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        ds = [to_d(x, sigmas[i], denoised), *ds][:order]
        if callback:
            callback(i, x, denoised)
        coefficients = lms_coefficients(sigmas_host, i, len(ds))
        x = x + sum(c * d for c, d in zip(coefficients, ds, strict=True))
    return x


def dpmpp_2s_ancestral(
    denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback: Callback = None, progress=False
):
    """DPM-Solver++(2S): a second-order singlestep data-prediction step (midpoint in t = -log sigma) down to
    sigma_down, then fresh noise up to sigma_next; Euler on the step to 0."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if callback:
            callback(i, x, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = denoise(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0 and eta:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def dpmpp_sde(
    denoise: Denoise,
    x,
    sigmas,
    noise: Noise,
    eta=1.0,
    s_noise=1.0,
    r: float = 1 / 2,
    callback: Callback = None,
    progress=False,
):
    """DPM-Solver++ SDE: two stochastic data-prediction stages per step, the first to t + r*h, the second
    combining both estimates; Euler on the step to 0. Meant for Brownian-tree noise."""
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        if eta:
            x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = denoise(x_2, _sigma(s))
        sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        if eta:
            x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


def dpmpp_2m(denoise: Denoise, x, sigmas, callback: Callback = None, progress=False):
    """DPM-Solver++(2M): second-order multistep data prediction; first order on the first and last steps."""
    old_denoised = None
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            denoised_d = denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def dpmpp_2m_sde(
    denoise: Denoise,
    x,
    sigmas,
    noise: Noise,
    eta=1.0,
    s_noise=1.0,
    solver_type: str = "midpoint",
    callback: Callback = None,
    progress=False,
):
    """DPM-Solver++(2M) SDE (`solver_type` "midpoint" or "heun" for the second-order correction); the step to
    0 returns the denoised estimate."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old_denoised, h_last = None, None
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _t(sigmas[i + 1]) - _t(sigmas[i])
        eta_h = eta * h
        phi = (-h - eta_h).expm1().neg()
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
        if eta:
            x = (
                x
                + noise(sigmas[i], sigmas[i + 1])
                * sigmas[i + 1]
                * (-2 * eta_h).expm1().neg().sqrt()
                * s_noise
            )
        old_denoised, h_last = denoised, h
    return x


def dpmpp_3m_sde(
    denoise: Denoise, x, sigmas, noise: Noise, eta=1.0, s_noise=1.0, callback: Callback = None, progress=False
):
    """DPM-Solver++(3M) SDE: third-order multistep (second order on the second step); the step to 0 returns
    the denoised estimate."""
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = _t(sigmas[i + 1]) - _t(sigmas[i])
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        phi_2 = h_eta.neg().expm1() / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta:
            x = (
                x
                + noise(sigmas[i], sigmas[i + 1])
                * sigmas[i + 1]
                * (-2 * h * eta).expm1().neg().sqrt()
                * s_noise
            )
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


# DPM-Solver (Lu et al. 2022) in t = -log(sigma), eps form: the fixed-step "fast" schedule and the adaptive one.


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps in eps form; the eps of each stage is cached per step."""

    def __init__(self, denoise: Denoise) -> None:
        self.denoise = denoise

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if key not in cache:
            cache[key] = (x - self.denoise(x, _sigma(t))) / _sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache: dict):
        h = t_next - t
        return x - _sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache: dict, r1: float = 1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache: dict, r1: float = 1 / 3, r2: float = 2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - _sigma(s2) * (r2 * h).expm1() * eps
            - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )

    def ancestral(self, t, t_next, t_end, eta: float):
        """(t to step to, noise std to add after) for an ancestral step from t to t_next."""
        if not eta:
            return t_next, torch.zeros(())
        sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_down = torch.minimum(t_end, _t(sigma_down))
        return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


def dpm_fast(
    denoise: Denoise,
    x,
    sigma_min,
    sigma_max,
    n: int,
    noise: Noise,
    eta=0.0,
    s_noise=1.0,
    callback: Callback = None,
    progress=False,
):
    """DPM-Solver-Fast: n model evaluations in steps of order 3 (then 2 and 1 to use them all), evenly spaced
    in t from sigma_max to sigma_min. Ends at sigma_min, not 0."""
    solver = _DPMSolver(denoise)
    t_start, t_end = _t(torch.as_tensor(sigma_max)), _t(torch.as_tensor(sigma_min))
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}
    for i in trange(len(orders), disable=not progress):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_down, sigma_up = solver.ancestral(t, t_next, t_end, eta)
        eps = solver.eps(cache, "eps", x, t)
        if callback:
            callback(i, x, x - _sigma(t) * eps)
        x = step[orders[i]](x, t, t_down, cache)
        if eta:
            x = x + sigma_up * s_noise * noise(_sigma(t), _sigma(t_next))
    return x


def dpm_adaptive(
    denoise: Denoise,
    x,
    sigma_min,
    sigma_max,
    noise: Noise,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta=0.0,
    s_noise=1.0,
    callback: Callback = None,
    progress=False,
):
    """DPM-Solver-12/23 with adaptive steps: the difference of an order-(k-1) and an order-k step estimates
    the error, and a PID controller (integral only by default) sets the next step in t. Ends at sigma_min."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    solver = _DPMSolver(denoise)
    t_start, t_end = _t(torch.as_tensor(sigma_max)), _t(torch.as_tensor(sigma_min))
    controller = _PIDStepSize(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    s, x_prev, steps = t_start, x, 0
    while s < t_end - 1e-5:
        cache: dict = {}
        t = torch.minimum(t_end, s + controller.h)
        t_down, sigma_up = solver.ancestral(s, t, t_end, eta)
        denoised = x - _sigma(s) * solver.eps(cache, "eps", x, s)
        if order == 2:
            x_low = solver.step_1(x, s, t_down, cache)
            x_high = solver.step_2(x, s, t_down, cache)
        else:
            x_low = solver.step_2(x, s, t_down, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_down, cache)
        delta = torch.maximum(torch.tensor(atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if controller.propose_step(error):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise(_sigma(s), _sigma(t)) if eta else x_high
            s = t
        if callback:
            callback(steps, x, denoised)
        steps += 1
    return x


class _PIDStepSize:
    """PID control of the step size h from the inverse error of the last steps (Söderlind's digital filter)."""

    def __init__(self, h, pcoeff, icoeff, dcoeff, order, accept_safety, eps=1e-8) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: torch.Tensor) -> bool:
        """Scale h by the filtered inverse error (limited by 1 + atan(f - 1)); accept the step unless that
        factor is below accept_safety."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + np.arctan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return bool(accept)


def unipc(
    denoise: Denoise,
    x,
    sigmas,
    order: int = 2,
    variant: str = "bh2",
    callback: Callback = None,
    progress=False,
):
    """UniPC (Zhao et al. 2023), data prediction, multistep: after each model evaluation the corrector UniC
    refines the current x with the new estimate, then the predictor UniP steps on with up to `order` past
    estimates (lower order on the first steps and, for the last ones, as many steps as remain). `variant`
    "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1). As diffusers' UniPCMultistepScheduler (predict_x0, its
    defaults bh2 and order 2); the model is not evaluated at sigma = 0.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    n = len(sigmas) - 1
    lambdas = [
        _t(s) if s > 0 else torch.tensor(float("inf")) for s in sigmas
    ]  # log(alpha / sigma) = -log sigma
    history: list[torch.Tensor] = []  # denoised estimates, newest last
    x_last, last_order = None, 0
    for i in _steps(sigmas, progress):
        denoised = denoise(x, sigmas[i])
        if callback:
            callback(i, x, denoised)
        if x_last is not None:
            x = _unipc_update(x_last, history, lambdas, i - 1, last_order, variant, sigmas, denoised)
        history = [*history, denoised][-order:]
        last_order = min(order, n - i, len(history))
        x_last = x
        x = _unipc_update(x, history, lambdas, i, last_order, variant, sigmas)
    return x


def _unipc_update(x, history, lambdas, i, p, variant, sigmas, model_t=None):
    """UniP-p from step i to i + 1 (model_t None), or UniC-p at step i + 1 with its estimate model_t.

    history[-1] is the estimate at step i, history[-1-k] at step i - k. The state is x0 + sigma * noise; the
    VP form diffusers uses (x_vp = alpha x) gives the same updates once alpha is factored out."""
    sigma_s0, sigma_t = sigmas[i], sigmas[i + 1]
    m0 = history[-1]
    h = lambdas[i + 1] - lambdas[i]
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = hh if variant == "bh1" else torch.expm1(hh)
    rks, d1s = [], []
    for k in range(1, p):
        rk = (lambdas[i - k] - lambdas[i]) / h
        rks.append(rk)
        d1s.append((history[-1 - k] - m0) / rk)
    rks.append(torch.ones(()))
    rks_t = torch.stack(rks)
    factorial, h_phi_k = 1, h_phi_1 / hh - 1
    R, b = [], []
    for k in range(1, p + 1):
        R.append(rks_t ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R_t, b_t = torch.stack(R), torch.stack(b)
    # alpha_t x_t in diffusers' VP form is x_t / sqrt(1 + sigma_t^2); here everything is divided by alpha_t
    x_next = (sigma_t / sigma_s0) * x - h_phi_1 * m0  # m0 itself when sigma_t = 0 (h = inf)
    if model_t is None:
        if d1s:
            rhos = torch.full((1,), 0.5) if p == 2 else torch.linalg.solve(R_t[:-1, :-1], b_t[:-1])
            x_next = x_next - b_h * sum(r * d for r, d in zip(rhos, d1s, strict=True))
        return x_next
    rhos = torch.full((1,), 0.5) if p == 1 else torch.linalg.solve(R_t, b_t)
    correction = sum(r * d for r, d in zip(rhos[:-1], d1s, strict=True)) if d1s else 0
    return x_next - b_h * (correction + rhos[-1] * (model_t - m0))
