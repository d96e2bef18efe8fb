"""starflow: STARFlow and STARFlow-V, transformer autoregressive normalizing flows, in PyTorch."""
__version__ = "0.1.0"
