"""Recurrent encoders, pooling and the text classifier."""
