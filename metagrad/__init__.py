"""metagrad: gradient-based meta-learning for any torch.nn.Module."""
