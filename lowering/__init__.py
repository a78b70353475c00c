"""FX passes that find attention in a graph and rewrite it to ``torch.ops.hyper.attention``."""
