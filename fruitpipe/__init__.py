"""fruitpipe: pretrained-CNN features, PCA and clean outputs for folders of fruit photos, on Apache Spark."""

__version__ = "0.1.0"
