"""The pipeline's stages: small functions over one Exchange, in the order pipeline.py runs them."""
