"""Training of the generator/critic pair: plain PyTorch (engine, checkpoint, loop, DDP helpers);
Ray appears only in :mod:`ldct.training.ray_train`."""
