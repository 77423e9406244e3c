"""An AUTOMATIC1111-compatible HTTP API and a small web page over one loaded model (`scripts/server.py`)."""
