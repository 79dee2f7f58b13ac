"""Datasets in: synthetic mosaics, Label Studio export, augmentation."""
