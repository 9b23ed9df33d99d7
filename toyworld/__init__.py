"""The toy world: a synthetic video world with ground truth, its pixel instruments, tiny-base
pretraining and evaluation, and the demo / bench / compose experiments on the tiny base."""
