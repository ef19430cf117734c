"""Channels coupled across Convs (residual streams, depthwise chains, Concat/Split, SE gates): the
union-find analysis, the exact removal of a group, and the choice of groups for ``--coupled-rate``."""
