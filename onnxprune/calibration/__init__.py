"""Recovery from unlabelled data: calibration inputs, the segment-by-segment stream of the dense and
pruned models, least squares, and the refit of kept kernels and dense followers."""
