"""Small shared pieces: atomic files, safe checkpoints, config errors,
torchrun/DDP helpers, and every reach into torchreid's internals."""
