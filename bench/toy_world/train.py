"""Train the toy model from scratch on the toy world and write the shipped weights.

    .venv/bin/python bench/toy_world/train.py            # regenerates bench/toy_world/toy_sdxl_vpred_zsnr.safetensors

Deterministic: one seed fixes the world samples, the noise, the timesteps and the initial weights, and the run
uses one CPU thread (torch.set_num_threads(1)), so the same command gives the same file on the same torch build.
The training goes through ComfyUI's own BaseModel.apply_model (v-prediction, zero-terminal-SNR model sampling),
the exact function the sampler calls, so what is trained is what the benchmark samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from comfy_harness import boot_comfy  # noqa: E402

boot_comfy()

from bench.toy_world import model as toy_model  # noqa: E402
from bench.toy_world import world  # noqa: E402

DEFAULTS = {
    "size": 16,
    "model_channels": 32,
    "batch": 16,
    "steps": 6000,
    "lr": 1.5e-3,
    "warmup": 50,
    "final_lr_fraction": 0.05,
    "ema": 0.998,
    "uncond_probability": 0.1,
    "snr_cap": 5.0,
    "subject_weight": 5.0,
    "seed": 0,
}


def loss_weights(sigmas: torch.Tensor, snr_cap: float) -> torch.Tensor:
    """Weights on the x0 error. Plain v-prediction loss equals (1 + SNR) times the x0 error; capping SNR
    (min-SNR weighting, Hang et al. 2023) keeps the near-clean steps from dominating a short run, and the +1 keeps
    full weight at the zero-SNR terminal step, where the model must learn each scene's colour from the prompt."""
    snr = 1.0 / sigmas.double() ** 2
    return (1.0 + snr.clamp(max=snr_cap)).float()


def learning_rate(step: int, settings: dict) -> float:
    if step < settings["warmup"]:
        return settings["lr"] * (step + 1) / settings["warmup"]
    progress = (step - settings["warmup"]) / max(1, settings["steps"] - settings["warmup"])
    floor = settings["final_lr_fraction"]
    return settings["lr"] * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(settings: dict, out: Path, log=print) -> dict:
    torch.set_num_threads(1)  # the budget is one core of a shared machine; also keeps reductions deterministic
    torch.manual_seed(settings["seed"])
    config = toy_model.ToyConfig(size=settings["size"], model_channels=settings["model_channels"])
    base_model = toy_model.build_base_model(config)
    unet = base_model.diffusion_model
    toy_model.init_weights(unet, settings["seed"])
    unet.train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    vocab = toy_model.vocabulary()
    generator = torch.Generator().manual_seed(settings["seed"] + 1)
    batch = settings["batch"]
    sigmas_table = base_model.model_sampling.sigmas
    adm = base_model.encode_adm(**toy_model.adm_extras(batch)).detach()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    start = time.time()
    running = None
    for step in range(settings["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        sample = world.generate(batch, config.size, generator)
        keep_prompt = torch.rand(batch, generator=generator) >= settings["uncond_probability"]
        scenes = [int(s) if k else None for s, k in zip(sample.scenes, keep_prompt, strict=True)]
        subjects = [bool(p) and bool(k) for p, k in zip(sample.present, keep_prompt, strict=True)]
        context = toy_model.context(vocab, scenes, subjects)
        timesteps = torch.randint(0, len(sigmas_table), (batch,), generator=generator)
        sigmas = sigmas_table[timesteps]
        noise = torch.randn(sample.latents.shape, generator=generator)
        noisy = sample.latents + sigmas[:, None, None, None] * noise
        denoised = base_model.apply_model(noisy, sigmas, c_crossattn=context, y=adm)
        # Subjects cover ~10 % of the pixels while the background texture carries most of the variance: weight
        # subject pixels up so a short run learns flat two-colour squares, not just the memorisable backgrounds.
        pixel_weight = 1.0 + (settings["subject_weight"] - 1.0) * sample.subject_mask[:, None].float()
        per_image = (pixel_weight * (denoised - sample.latents) ** 2).mean(dim=(1, 2, 3))
        loss = (per_image * loss_weights(sigmas, settings["snr_cap"])).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(settings["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for key, value in unet.state_dict().items():
                if value.dtype.is_floating_point:
                    ema[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
                else:
                    ema[key].copy_(value)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == settings["steps"] - 1:
            elapsed = time.time() - start
            eta = elapsed / (step + 1) * (settings["steps"] - step - 1)
            log(f"step {step:5d}  loss {loss.item():.4f}  avg {running:.4f}  lr {learning_rate(step, settings):.2e}  "
                f"{elapsed / (step + 1):.2f} s/step  elapsed {elapsed / 60:.1f} min  eta {eta / 60:.1f} min")
    unet.load_state_dict(ema)
    unet.eval()
    elapsed = time.time() - start
    summary = {"steps": settings["steps"], "final_loss_avg": round(running, 5), "train_minutes": round(elapsed / 60, 2),
               "torch": torch.__version__, "settings": json.dumps(settings, sort_keys=True)}
    toy_model.save_weights(base_model, vocab, config, out, summary)
    log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB) after {elapsed / 60:.1f} min")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=toy_model.WEIGHTS_PATH)
    args = parser.parse_args()
    settings = {key: getattr(args, key) for key in DEFAULTS}
    train(settings, args.out, log=lambda message: print(message, flush=True))


if __name__ == "__main__":
    main()
