"""An ImageNet-shaped sample dataset made from real photographs (see ``generate``)."""
