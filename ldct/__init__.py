"""ldct: low-dose CT denoising study (EfficientNetV2 + WGAN-GP) on Ray Tune with MLflow."""

__version__ = "0.1.0"
