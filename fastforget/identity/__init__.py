"""Identity encoders and identity sets."""
from fastforget.identity.encoder import IdentityEncoder, TestbedEncoder, as_image_batch, load_encoder

__all__ = ["IdentityEncoder", "TestbedEncoder", "load_encoder", "as_image_batch"]
