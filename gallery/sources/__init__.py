"""Where model files come from: http(s) and hf:// (http.py), the package index (pypi.py);
mesh peers are asked through the installer's PeerFetcher (mesh/files.py)."""
