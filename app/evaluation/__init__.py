"""Sample quality for digits: Inception Score and FID measured with a small MNIST classifier.

Salimans et al. 2016 (IS) and Heusel et al. 2017 (FID) use an ImageNet Inception network; for
MNIST we train and ship our own classifier (`models/mnist-classifier/`) and use its softmax for IS
and its 128-d penultimate features for FID. `classifier` holds the network, `metrics` the maths,
`train_classifier` the training run and `cli` the `ddpm train-classifier` / `ddpm eval` commands.
"""
