"""The built-in worlds: synthetic video with ground truth, generated to shards deterministically from a seed.

    python -m worlds.moving_digits --output data/moving_digits --num-videos 1024 --val-videos 256 --seed 0
    python -m worlds.push_world --output data/push_world --num-videos 1024 --val-videos 256 --seed 0
    python -m worlds.pusht --output data/pusht --num-videos 1024 --val-videos 256 --seed 0   (the `pusht` extra)

Each world is a `simulate(num_frames, rng, ...) -> (frames, sidecar)` written through `simulated.write_world`, which
hands the videos to the shard writer (data_pipeline.writer.write_samples). The worlds sit above the writer: nothing
in data_pipeline/ or worldmodel/ imports them.
"""
