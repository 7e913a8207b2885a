"""lbxdp: a Layer-4 load balancer with an XDP data path (bpf/, compiled by bcc) and this control plane."""

__version__ = "0.1.0"
