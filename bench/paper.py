"""Published numbers printed beside ours. Each constant says where it comes from.

Table 8 of the CogVideoX paper (arXiv 2408.06072): one DiT forward step, bf16, H800, seconds; the paper does not
say which model size. Table 7: 50-step inference, bf16, H800, seconds and GB. The official repository
(github.com/THUDM/CogVideo README, "inference speed", 50 steps, H100) gives about 45 s for 2B and 90 s for 5B at
480x720x49 frames.
"""
from __future__ import annotations

# Table 8 resolutions: (name, frames, height, width) -> latent grid (T, Hg, Wg) = ((f-1)/4+1, h/16, w/16)
TABLE8_SHAPES = {
    "256x384x6s": (49, 256, 384),     # 13 x 16 x 24 = 4,992 vision tokens
    "480x720x6s": (49, 480, 720),     # 13 x 30 x 45 = 17,550
    "768x1360x5s": (41, 768, 1360),   # 11 x 48 x 85 = 44,880
}
TABLE8_SECONDS = {
    "2d+1d": {"256x384x6s": 0.38, "480x720x6s": 1.26, "768x1360x5s": 4.17},
    "3d": {"256x384x6s": 0.41, "480x720x6s": 2.11, "768x1360x5s": 9.60},
}
TABLE8_DEVICE = "H800, bf16, one DiT forward step (model size not stated)"

# Table 7: {(model, resolution): (seconds, GB)}
TABLE7 = {
    ("2b", "480x720x6s"): (49, 18), ("5b", "480x720x6s"): (113, 26),
    ("2b", "768x1360x5s"): (220, 53), ("5b", "768x1360x5s"): (500, 76),
}
TABLE7_DEVICE = "H800, bf16, 50 steps"
OFFICIAL_H100_SECONDS = {"2b": 45, "5b": 90}   # THUDM/CogVideo README, 480x720x49, 50 steps


def vision_tokens(frames: int, height: int, width: int, temporal: int = 4, spatial: int = 8, patch: int = 2) -> int:
    return ((frames - 1) // temporal + 1) * (height // spatial // patch) * (width // spatial // patch)
