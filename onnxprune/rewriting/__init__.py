"""The graph rewrite: Gather + Conv(group=G) per pruned layer, permutations folded into neighbours,
and the fp16 conversion of the verified output."""
