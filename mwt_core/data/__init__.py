"""Data: dataset loading and validation, input specs, on-device batches and augmentation."""
