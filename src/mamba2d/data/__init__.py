"""LightningDataModules and datasets."""
