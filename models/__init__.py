"""Plain nn.Modules (no Lightning): the CLIP backbone factory, relevance engine and method models."""
