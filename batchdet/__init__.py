"""batchdet: batch object detection with MLPerf SSD-ResNet34 1200x1200 on Ray."""

__version__ = "0.1.0"
