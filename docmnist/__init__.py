"""DocMNIST: synthetic 84x84 images of a 3x3 grid of coloured MNIST digits with shapes, and their captions."""
