"""Ops layer: ``torch.library`` schemas and the autograd functions over them."""
