"""The 2D selective scan: public op, pure-PyTorch reference and the contract they share."""

from .contract import DIRECTIONS
from .reference import selective_scan_2d_ref
from .scan import selective_scan_2d

__all__ = ["DIRECTIONS", "selective_scan_2d", "selective_scan_2d_ref"]
