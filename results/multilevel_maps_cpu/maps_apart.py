"""How far each trained multilevel map moved from its averaging start, and (per_level) how far the maps of
levels 3..L lie from level 2's: relative Frobenius norms, per layer and side, from each point's best.ckpt.

    PYTHONPATH=. python results/multilevel_maps_cpu/maps_apart.py results/multilevel_maps_cpu/points/*/checkpoints/best.ckpt
"""

import sys

import torch
from omegaconf import OmegaConf

from fma.downsample import Downsample


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(paths: list[str]) -> None:
    for path in paths:
        config = OmegaConf.load(path.replace("checkpoints/best.ckpt", ".hydra/config.yaml"))
        attention, heads = config.model.attention, config.model.num_heads
        options = dict(head_dim=config.model.dim // heads, block_size=attention.block_size, rank=attention.rank,
                       max_seq_len=config.data.seq_len, multilevel_maps=attention.multilevel_maps)
        start = Downsample("multilevel", **options)
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        print(f"{path} ({attention.multilevel_maps}):")
        for key in sorted(k for k in state if k.endswith("_downsample.weight")):
            trained = Downsample("multilevel", **options)
            trained.load_state_dict({"weight": state[key], "bias": state[key.removesuffix("weight") + "bias"]})
            levels = range(1, (trained.num_levels or 2) + 1)
            with torch.no_grad():
                moved = [relative(trained.level_parameters(l)[0], start.level_parameters(l)[0]) for l in levels]
                apart = [relative(trained.level_parameters(l)[0], trained.level_parameters(2)[0]) for l in levels[2:]]
            name = key.removeprefix("net.").removesuffix("_downsample.weight").replace(".attention.", " ")
            print(f"  {name:>9}: moved from start W1, A_2.. {' '.join(f'{m:.3f}' for m in moved)}"
                  + (f"; A_3.. from A_2 {' '.join(f'{a:.3f}' for a in apart)}" if apart else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
