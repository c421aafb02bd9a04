"""inferpass: capture a transformer with torch.export, rewrite it with passes, lower it, run it."""

import warnings

__version__ = "0.1.0"

# torch's own copies of exported programs (run_decompositions, deepcopy of a graph) trip its LeafSpec deprecation
# on every compile: nothing a user of inferpass can act on, so it is not shown
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
