"""inferpass: capture a transformer with torch.export, rewrite it with passes, lower it, run it."""

__version__ = "0.1.0"
