"""The vocabulary of sparsity: layer-wise distributions, mask construction, structures, scores, schedules."""
