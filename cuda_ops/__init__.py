"""CUDA C++ sources of the 2D selective scan, compiled at run time by NVRTC (shipped as package data)."""
