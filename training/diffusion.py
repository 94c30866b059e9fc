"""What a diffusion model is trained to predict, for either prediction type a scheduler declares."""

import torch


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The regression target: the noise (epsilon models) or the velocity (v-prediction, e.g. SD2.1 768)."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def predicted_x0(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latents the model's prediction implies (x0_hat)."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    if scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def ddim_step(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor,
              next_timesteps: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from ``timesteps`` to the smaller ``next_timesteps``, per sample: the clean
    latents and the noise the prediction implies, recombined at the next noise level."""
    alphas = scheduler.alphas_cumprod.to(noisy.device)
    now, later = alphas[timesteps].view(-1, 1, 1, 1), alphas[next_timesteps].view(-1, 1, 1, 1)
    x0 = predicted_x0(scheduler, noisy, prediction, timesteps)
    noise = (noisy - now.sqrt() * x0) / (1 - now).sqrt()
    return later.sqrt() * x0 + (1 - later).sqrt() * noise


def vae_downscale(vae) -> int:
    """Image pixels per latent pixel: every decoder up block but the last doubles the size."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
