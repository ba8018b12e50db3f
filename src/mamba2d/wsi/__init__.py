"""Whole-slide images: OpenSlide reading, tissue masks, tiling, feature extraction to CLAM h5, heatmaps."""
