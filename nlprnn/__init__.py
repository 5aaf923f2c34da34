"""nlprnn: train, evaluate and ship recurrent-network text classifiers.

Importing the package is cheap: it loads neither torch nor Lightning.
"""

__version__ = "0.1.0"
