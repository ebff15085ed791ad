"""Typed configuration of the data pipeline (the `data:` section of an experiment config)."""

from __future__ import annotations

from dataclasses import dataclass

ASPECTS = ("crop", "pad", "squash")  # data.aspect (data_pipeline/decoders.py: ASPECT_MODES)


@dataclass
class DataConfig:
    """Where the shards are and how clips are cut and batched.

    `train_shards` / `val_shards` are a local glob (`data/train/shard-*.tar`), a brace pattern
    (`data/train/shard-{000000..000009}.tar`), a URL (`https://host/shard-{000..009}.tar`), a `pipe:` command
    (`pipe:aws s3 cp s3://bucket/shard-{000000..000099}.tar -`), or several of these separated by spaces
    (`pipe:` commands contain spaces themselves, so several of them are separated by `::`).
    """

    train_shards: str = "data/moving_digits/train/shard-*.tar"
    val_shards: str = "data/moving_digits/val/shard-*.tar"
    num_context: int = 4  # frames given to a rollout before it predicts
    num_target: int = 4  # frames after the context; a training clip has num_context + num_target frames
    frame_step: int = 1  # take every frame_step-th frame of the video
    image_size: int = 64  # frames are resized to image_size x image_size on decode (0 keeps the stored size)
    # how a frame that is not square becomes image_size x image_size: crop (short side to image_size, centre crop),
    # pad (long side to image_size, black bars) or squash (both sides, the aspect lost). Square videos give the same
    # frames in every mode.
    aspect: str = "crop"
    # training only, with aspect crop: a random crop position along the long side, one per clip (the same for all its
    # frames); evaluation always takes the centre crop
    random_crop: bool = False
    batch_size: int = 16  # clips per batch, per process
    num_workers: int = 2  # DataLoader worker processes per training process
    shuffle_buffer: int = 64  # samples held by the shuffle buffer (per worker)
    clips_per_video: int = 1  # clips cut from each decoded video (more = fewer decodes per clip)
    epoch_batches: int = 100  # batches per process per epoch; equal on every rank so no rank waits
    # the trainer warns when more than this share of the latest ~1000 samples read were skipped (bad data)
    max_skip_share: float = 0.05
    decoder: str = "decord"  # decord | pyav (decord falls back to pyav per video when it cannot read it)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_skip_share <= 1.0:
            raise ValueError(f"data.max_skip_share must be in [0, 1], got {self.max_skip_share}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"data.aspect={self.aspect!r} is not one of {', '.join(ASPECTS)}")
        if self.random_crop and (self.aspect != "crop" or self.image_size <= 0):
            raise ValueError(
                f"data.random_crop=true needs data.aspect=crop and data.image_size > 0 (got aspect={self.aspect!r}, "
                f"image_size={self.image_size}): it picks where the image_size x image_size crop is taken"
            )

    @property
    def clip_length(self) -> int:
        """Frames per training clip (num_context + num_target)."""
        return self.num_context + self.num_target
