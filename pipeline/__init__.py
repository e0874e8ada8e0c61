"""kdpipe library: cache format, capture, losses, training. No CLI code here."""
