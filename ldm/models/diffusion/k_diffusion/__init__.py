"""The k-diffusion sampler family (Euler, Heun, DPM2, LMS, DPM-Solver(++), UniPC) over the model's own
noise schedule: schedules.py (sigmas), denoiser.py (the model as D(x, sigma)), noise.py (per-image noise),
algorithms.py (one function per algorithm), sampler.py (the Sampler classes the registry names)."""
