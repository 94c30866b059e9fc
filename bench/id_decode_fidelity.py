"""How close the identity loss's window decode (--id_decode window) comes to the full decode, per margin.

    python bench/id_decode_fidelity.py                         # the tiny preset's VAE and a random SD-size VAE
    python bench/id_decode_fidelity.py --vae path/to/sd/vae    # a trained VAE (a diffusers AutoencoderKL folder)

Two synthetic faces off-centre (grid cells (1, 2) and (3, 0) of a 4x4 grid, a quarter of the image wide, their
landmarks the ArcFace template in the cell), encoded by the VAE; per margin (latent pixels) the window decode is
compared with the full one: the aligned 112x112 faces' largest pixel difference as a share of their pixel range,
the identity loss against the photo's own ArcFace feature (a small random IResNet), and the cosine between the two
losses' gradients with respect to the latents.
"""

import argparse
import pathlib
import runpy

import torch

# Run as a script: import this checkout as the package `comfyui_idadapter` (ComfyUI owns the top-level name `nodes`).
runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "training" / "_bootstrap.py"))

from comfyui_idadapter.nodes.arch.iresnet import align_faces  # noqa: E402
from comfyui_idadapter.training import tiny  # noqa: E402
from comfyui_idadapter.training.id_decode import WINDOW_MARGIN, vae_downscale, window_fidelity  # noqa: E402

CELLS = ((1, 2), (3, 0))


def measure(vae, latent_size: int, margins: list[int]) -> None:
    size = latent_size * vae_downscale(vae)
    images, landmarks = tiny.synthetic_faces(CELLS, size)
    arcface = tiny.random_iresnet(0)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        f_a = arcface(align_faces(images, landmarks))
    print(f"{latent_size}x{latent_size} latents ({size} px), faces {size // 4} px wide")
    print("margin | face max |diff| / range | loss full | loss window | gradient cosine")
    for margin in margins:
        m = window_fidelity(vae, arcface, latents, landmarks, f_a, margin)
        print(f"{margin:6d} | {m['face_max_diff']:24.1%} | {m['loss_full']:9.4f} | {m['loss_window']:11.4f} | "
              f"{m['grad_cosine']:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="", help="a diffusers AutoencoderKL folder (default: the random VAEs)")
    parser.add_argument("--latent_size", type=int, default=32)
    parser.add_argument("--margins", type=int, nargs="+", default=[0, 4, WINDOW_MARGIN, 12, 16])
    args = parser.parse_args()
    if args.vae:
        from diffusers import AutoencoderKL

        print(f"VAE {args.vae}")
        measure(AutoencoderKL.from_pretrained(args.vae).eval(), args.latent_size, args.margins)
        return
    print("the tiny preset's VAE (random)")
    measure(tiny.tiny_vae().eval(), args.latent_size, args.margins)
    print("an SD-size VAE (random)")
    measure(tiny.sd_size_vae().eval(), args.latent_size, args.margins)


if __name__ == "__main__":
    main()
