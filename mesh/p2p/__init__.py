"""The mesh's libp2p layer: the only package of inference-mesh that imports libp2p.

See mesh/p2p/node.py for what ``open_p2p`` composes and mesh/p2p/host.py for the
py-libp2p 0.8.1 quirks and where each is handled.
"""

from mesh.p2p.node import P2P, Stream, open_p2p

__all__ = ["P2P", "Stream", "open_p2p"]
