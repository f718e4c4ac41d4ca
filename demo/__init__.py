"""The demo of `loraserve demo`."""
